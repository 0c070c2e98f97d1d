"""The grpc-web bridge and the customer chat page."""
