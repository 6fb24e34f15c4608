"""gRPC transport: channel options and limits, the client side of the stage service."""
