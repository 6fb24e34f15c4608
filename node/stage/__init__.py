"""A stage daemon: its runtime (weights, optimizer, step state), gRPC service and the step protocol."""
