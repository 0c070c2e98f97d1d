"""Domain services: routing, conversations, invites, agents. Plain Python, no grpc."""
