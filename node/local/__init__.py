"""``swarm-node local``: a whole swarm on one machine, as separate processes."""
