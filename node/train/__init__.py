"""Training math shared by the daemons and the single-process reference: optimizer, clipping, devices."""
