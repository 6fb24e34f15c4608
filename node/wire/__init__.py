"""Wire values: tensor streams for gRPC and the typed records stored in the DHT."""
