"""The model: a LLaMA-style decoder and its split into pipeline stages."""

from node.model.llama import BlockStage, EmbeddingStage, FullModel, build_stage

__all__ = ["BlockStage", "EmbeddingStage", "FullModel", "build_stage"]
