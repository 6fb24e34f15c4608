"""Peer discovery through a hivemind DHT: bootstrap nodes, stage announcements, swarm lookups."""
