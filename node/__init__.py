"""swarm-node: pipeline-parallel LLM training on unreliable machines with CheckFree recovery."""

__version__ = "0.1.0"
