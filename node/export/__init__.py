"""Exporting a swarm's model to the Hugging Face format (and back, for ``--init-from``)."""
