"""The grpc-web bridge and the customer chat page."""

from .bridge import DEFAULT_MAX_BODY_BYTES, Bridge, split_host_port, start_bridge

__all__ = ["DEFAULT_MAX_BODY_BYTES", "Bridge", "split_host_port", "start_bridge"]
