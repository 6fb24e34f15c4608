"""Blockwise 8-bit quantisation of activations and gradients on the wire (``wire_dtype = "int8"``).

As in SWARM's compression of what travels between pipeline stages: the flattened tensor is cut into blocks
of ``BLOCK`` elements; each block travels as int8 codes (``round(x / scale)``, in [-127, 127]) and one fp32
scale, its largest magnitude / 127. That is about a quarter of fp32's bytes (plus 4 bytes per block) and a
relative error of at most half a step (1/254 of the block's largest magnitude) per element.

A quantised tensor is sent as two tensors of one stream: the codes under the activation's name, in its
shape, and the scales under :data:`SCALE_NAME`. The receiver checks both before it rebuilds the tensor.
"""

from __future__ import annotations

import math

import torch

BLOCK = 64
SCALE_NAME = "int8.scale"
_LEVELS = 127.0


def quantize_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes in ``x``'s shape, fp32 scales, one per block of :data:`BLOCK` elements)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % BLOCK)).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1) / _LEVELS
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block: codes 0, scale 0
    codes = torch.round(padded / safe[:, None]).clamp_(-_LEVELS, _LEVELS).to(torch.int8)
    return codes.view(-1)[:n].view(x.shape), scales


def num_blocks(numel: int) -> int:
    """How many scales a tensor of ``numel`` elements travels with."""
    return math.ceil(numel / BLOCK)


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """The tensor ``codes`` and ``scales`` stand for, in ``dtype``. Raises ValueError for scales that do not
    fit the codes (a count that is not one per block, a negative or non-finite scale)."""
    if codes.dtype != torch.int8 or scales.dtype != torch.float32 or scales.dim() != 1:
        raise ValueError(f"int8 codes and fp32 scales expected, got {codes.dtype} and {scales.dtype}")
    n = codes.numel()
    if scales.numel() != num_blocks(n):
        raise ValueError(f"{scales.numel()} scales for {n} elements (one per {BLOCK} expected)")
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise ValueError("a block scale is negative, NaN or Inf")
    flat = torch.nn.functional.pad(codes.reshape(-1).to(torch.float32), (0, (-n) % BLOCK)).view(-1, BLOCK)
    return (flat * scales[:, None]).view(-1)[:n].view(codes.shape).to(dtype)
