"""queuechat: contact-centre web chat over gRPC."""

__version__ = "0.1.0"
