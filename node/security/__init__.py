"""Swarm membership: the authority, node credentials, mutual TLS and who may call what."""
