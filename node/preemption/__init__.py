"""Spot-preemption notices: the clouds' metadata services and SIGTERM, turned into one kind of notice."""
