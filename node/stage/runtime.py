"""One stage's weights, optimizer and the bookkeeping of the step in flight; no networking here.

Every call runs on the daemon's single compute thread, so calls never interleave. A stage's parameters
change only in :meth:`StageRuntime.commit`, so between commits they *are* the last committed weights.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from node.config import SwarmConfig
from node.model import build_stage
from node.model.llama import EmbeddingStage, init_module
from node.train.commit import apply_update
from node.train.optim import autocast_for, grad_norm_sq, make_optimizer
from node.train.partials import combine_partials


class Reject(enum.StrEnum):
    """Why a message was refused; the value is the metric label and part of the gRPC status text."""

    STALE_STEP = "stale_step"
    UNKNOWN_STEP = "unknown_step"
    STALE_ATTEMPT = "stale_attempt"
    BAD_MICROBATCH = "bad_microbatch"
    DUPLICATE = "duplicate_microbatch"
    BAD_ROUTE = "bad_route"
    BAD_SHAPE = "bad_shape"
    BAD_DTYPE = "bad_dtype"
    OVERSIZE = "oversize"
    NON_FINITE = "non_finite"
    BAD_STREAM = "bad_stream"
    TRUNCATED = "truncated"
    NOT_READY = "not_ready"
    INCOMPLETE = "incomplete_step"
    NO_CHECKPOINT = "no_checkpoint"
    UNAUTHENTICATED = "unauthenticated"  # a TLS peer whose certificate names no node
    TLS_HANDSHAKE = "tls_handshake"  # a connection without a swarm certificate, refused at the handshake
    PERMISSION_DENIED = "permission_denied"  # a member calling an RPC its role does not allow
    BAD_MESSAGE = "bad_message"  # a request that does not parse as its RPC's message
    OUT_OF_RANGE = "out_of_range"  # a step or attempt no honest peer sends
    BUSY = "busy"  # another weight stream is being served, or too many streams are in flight
    FENCED = "fenced"  # a control request for a newer claim of this node's stage: it was taken over
    STALE_EPOCH = "stale_epoch"  # a control request for an older claim: the sender's view is out of date
    DRAINING = "draining"  # this node was preempted: it takes no new steps while it hands its stage over
    STALLED = "stalled"  # a stream that sent nothing for too long, or ran past its deadline


class StepError(Exception):
    """A request that does not fit the step in flight; nothing was changed."""

    def __init__(self, reason: Reject, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StepFailed(Exception):
    """The step in flight cannot complete (a peer was lost, refused or timed out); stage 0 aborts and
    replays it."""


@dataclass
class _Slot:
    inputs: torch.Tensor | None  # leaf with requires_grad (block stages)
    outputs: torch.Tensor | None
    backward_done: bool = False


class StageRuntime:
    """Weights, optimizer and in-flight microbatches of pipeline stage ``stage``."""

    def __init__(
        self,
        cfg: SwarmConfig,
        stage: int,
        device: torch.device,
        lr_scale: float = 1.0,
        weights: dict[str, torch.Tensor] | None = None,
        committed_step: int = 0,
        last_grad_norm: float = 0.0,
        random_seed: int | None = None,
    ) -> None:
        """A stage from the seed's initial weights, from rebuilt ``weights`` (a recovery; the optimizer is
        always fresh, at ``lr × lr_scale``), or from random weights drawn with ``random_seed``."""
        self.cfg = cfg
        self.stage = stage
        self.device = device
        module = build_stage(cfg, stage)
        if random_seed is not None:
            init_module(module, cfg.model, random_seed, f"random-stage{stage}", cfg.model.n_layers)
        if weights is not None:
            module.load_state_dict(weights, strict=True)
        self.module = module.to(device)
        self.lr_scale = lr_scale
        self.optimizer = make_optimizer(self.module, cfg.train, lr_scale)
        self.committed_step = committed_step
        self.attempt = 0
        self.last_grad_norm = last_grad_norm  # gradient L2 norm (before clipping) at this stage's last commit
        self._slots: dict[int, _Slot] = {}
        self._prepared_norm_sq: float | None = None

    # ---- step bookkeeping -------------------------------------------------------------------------
    def check_step(self, step: int, attempt: int) -> None:
        """Accepts messages of the step in flight; a newer attempt of it discards the older one's state."""
        if step < self.committed_step:
            raise StepError(Reject.STALE_STEP, f"step {step} is already committed (committed {self.committed_step})")
        if step > self.committed_step:
            raise StepError(
                Reject.UNKNOWN_STEP, f"step {step} is ahead of this stage (committed {self.committed_step})"
            )
        if attempt < self.attempt:
            raise StepError(Reject.STALE_ATTEMPT, f"attempt {attempt} of step {step} was superseded by {self.attempt}")
        if attempt > self.attempt:
            self._reset()
            self.attempt = attempt

    def _check_microbatch(self, mb: int) -> None:
        if not 0 <= mb < self.cfg.train.microbatches_per_step:
            raise StepError(
                Reject.BAD_MICROBATCH, f"microbatch {mb} outside 0..{self.cfg.train.microbatches_per_step - 1}"
            )

    def _reset(self) -> None:
        self._slots.clear()
        self._prepared_norm_sq = None
        self.optimizer.zero_grad(set_to_none=True)

    def abort(self, step: int, attempt: int) -> None:
        """Discards every microbatch and gradient of the step in flight (parameters untouched)."""
        if step == self.committed_step and attempt >= self.attempt:
            self._reset()
            self.attempt = attempt

    @property
    def microbatches_done(self) -> int:
        return sum(slot.backward_done for slot in self._slots.values())

    def done_microbatches(self) -> list[int]:
        """The microbatches whose backward this stage has accumulated in the step in flight, ascending."""
        return sorted(mb for mb, slot in self._slots.items() if slot.backward_done)

    def partial_grads(self) -> dict[str, torch.Tensor]:
        """This replica's accumulated gradient (its share of the step), cloned to CPU, by parameter name."""
        params = self.module.named_parameters()
        return {n: p.grad.detach().to("cpu", copy=True) for n, p in params if p.grad is not None}

    def gradient_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every parameter: what a partial gradient from a co-replica must match."""
        return {n: (tuple(p.shape), p.dtype) for n, p in self.module.named_parameters()}

    def activation_shape(self) -> tuple[int, int, int]:
        t = self.cfg.train
        return (t.microbatch_size, t.seq_len, self.cfg.model.d_model)

    # ---- block stages ------------------------------------------------------------------------------
    def forward(self, mb: int, x: torch.Tensor) -> torch.Tensor:
        self._check_microbatch(mb)
        if mb in self._slots:
            raise StepError(Reject.DUPLICATE, f"microbatch {mb} already forwarded in this step")
        inputs = x.to(self.device, torch.float32).requires_grad_(True)
        with autocast_for(self.device):
            outputs = self.module(inputs)
        self._slots[mb] = _Slot(inputs, outputs)
        return outputs.detach()

    def backward(self, mb: int, grad: torch.Tensor) -> torch.Tensor:
        slot = self._backward_slot(mb)
        slot.outputs.backward(grad.to(self.device, slot.outputs.dtype))
        grad_in = slot.inputs.grad
        self._finish_slot(slot)
        return grad_in

    # ---- stage 0 -----------------------------------------------------------------------------------
    def embed(self, mb: int, tokens: torch.Tensor) -> torch.Tensor:
        """Stage 0, first hop: token embedding of one microbatch."""
        self._check_microbatch(mb)
        if mb in self._slots:
            raise StepError(Reject.DUPLICATE, f"microbatch {mb} already embedded in this step")
        assert isinstance(self.module, EmbeddingStage)
        with autocast_for(self.device):
            h = self.module.embed_tokens(tokens.to(self.device))
        self._slots[mb] = _Slot(None, h)
        return h.detach()

    def head(self, mb: int, h: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Stage 0, last hop: loss of one microbatch and the gradient to send back (loss scaled by 1/M)."""
        self._check_microbatch(mb)
        slot = self._slots.get(mb)
        if slot is None or slot.inputs is not None:
            raise StepError(Reject.BAD_MICROBATCH, f"microbatch {mb} was not embedded in this step")
        assert isinstance(self.module, EmbeddingStage)
        hidden = h.to(self.device, torch.float32).requires_grad_(True)
        with autocast_for(self.device):
            loss = self.module.loss(hidden, targets.to(self.device))
        (loss / self.cfg.train.microbatches_per_step).backward()
        slot.inputs = hidden  # marks that the head ran; its gradient was just taken
        return float(loss.detach()), hidden.grad

    def embed_backward(self, mb: int, grad: torch.Tensor) -> None:
        """Stage 0: the gradient that came back to the embedding output."""
        slot = self._backward_slot(mb)
        slot.outputs.backward(grad.to(self.device, slot.outputs.dtype))
        self._finish_slot(slot)

    def _backward_slot(self, mb: int) -> _Slot:
        self._check_microbatch(mb)
        slot = self._slots.get(mb)
        if slot is None or slot.outputs is None:
            raise StepError(Reject.BAD_MICROBATCH, f"backward for microbatch {mb} that was not forwarded")
        if slot.backward_done:
            raise StepError(Reject.DUPLICATE, f"backward for microbatch {mb} already done")
        return slot

    @staticmethod
    def _finish_slot(slot: _Slot) -> None:
        slot.backward_done = True
        slot.outputs = None  # frees the graph and activations
        if slot.inputs is not None:
            slot.inputs = slot.inputs.detach()

    # ---- evaluation (forward only, on the committed weights; nothing is kept) -----------------------
    @torch.no_grad()
    def eval_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.module, EmbeddingStage)
        with autocast_for(self.device):
            return self.module.embed_tokens(tokens.to(self.device)).float()

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device):
            return self.module(x.to(self.device, torch.float32)).float()

    @torch.no_grad()
    def eval_loss(self, h: torch.Tensor, targets: torch.Tensor) -> float:
        assert isinstance(self.module, EmbeddingStage)
        with autocast_for(self.device):
            return float(self.module.loss(h.to(self.device, torch.float32), targets.to(self.device)))

    # ---- two-phase commit --------------------------------------------------------------------------
    def prepare(
        self,
        step: int,
        attempt: int,
        share: Sequence[int] | None = None,
        partials: Sequence[tuple[int, Mapping[str, torch.Tensor]]] = (),
    ) -> float:
        """Phase 1: every microbatch's backward is in; returns the squared gradient norm.

        With replicas, ``share`` lists the microbatches this replica computed and ``partials`` holds the other
        replicas' partial gradients (first microbatch of their share, gradients): the stage's gradient is
        their sum with this replica's in the fixed order of :func:`combine_partials`."""
        self.check_step(step, attempt)
        done = self.done_microbatches()
        expected = list(range(self.cfg.train.microbatches_per_step)) if share is None else list(share)
        if done != expected:
            raise StepError(
                Reject.INCOMPLETE, f"step {step}: microbatches {done} have finished backward, expected {expected}"
            )
        if partials:
            params = dict(self.module.named_parameters())
            own = {n: p.grad for n, p in params.items() if p.grad is not None}
            try:
                total = combine_partials([*partials, *([(expected[0], own)] if expected else [])])
            except ValueError as err:
                raise StepError(Reject.BAD_STREAM, f"step {step}: {err}") from None
            if total.keys() - params.keys():
                raise StepError(Reject.BAD_STREAM, f"step {step}: partial gradients of unknown parameters")
            for name, grad in total.items():
                params[name].grad = grad.to(self.device)
        self._prepared_norm_sq = grad_norm_sq(self.module)
        return self._prepared_norm_sq

    def commit(self, step: int, attempt: int, clip_coef: float) -> int:
        """Phase 2: clip and apply AdamW. Idempotent: re-committing a committed step is a no-op."""
        if step + 1 == self.committed_step:
            return self.committed_step
        self.check_step(step, attempt)
        if self._prepared_norm_sq is None:
            raise StepError(Reject.NOT_READY, f"step {step} was not prepared on stage {self.stage}")
        if not (math.isfinite(clip_coef) and 0 < clip_coef <= 1):
            raise StepError(Reject.NON_FINITE, f"clip coefficient {clip_coef} outside (0, 1]")
        apply_update(self.module, self.optimizer, clip_coef)
        self.last_grad_norm = math.sqrt(self._prepared_norm_sq)
        self.committed_step += 1
        self._reset()
        return self.committed_step

    @property
    def prepared(self) -> bool:
        """A step is prepared here and waits for its commit or abort."""
        return self._prepared_norm_sq is not None

    # ---- weights -----------------------------------------------------------------------------------
    def full_state(self) -> dict[str, torch.Tensor]:
        """Weights (``w.<name>``) and AdamW state (``opt.<param index>.<key>``), cloned to CPU: everything a
        copy of this stage needs to continue exactly (the stage-0 replica of checkfree+)."""
        out = {f"w.{k}": v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        for idx, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
        return out

    def handover_state(self) -> dict[str, torch.Tensor]:
        """:meth:`full_state` plus the 0-d tensors ``meta.lr_scale`` and ``meta.last_grad_norm``: everything a
        successor (a handoff, a parked state, a neighbour snapshot) needs to continue this stage exactly."""
        state = self.full_state()
        state["meta.lr_scale"] = torch.tensor(self.lr_scale, dtype=torch.float64)
        state["meta.last_grad_norm"] = torch.tensor(self.last_grad_norm, dtype=torch.float64)
        return state

    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`full_state` (the optimizer keeps this stage's own hyper-parameters)."""
        weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
        self.module.load_state_dict(weights, strict=True)
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, idx, key = name.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = value
        if opt_state:
            sd = self.optimizer.state_dict()
            sd["state"] = opt_state
            self.optimizer.load_state_dict(sd)

    def committed_state(self) -> dict[str, torch.Tensor]:
        """The last committed weights (valid between commits: parameters only change in commit)."""
        return {k: v.detach() for k, v in self.module.state_dict().items()}


def warm_up(cfg: SwarmConfig, device: torch.device) -> None:
    """Pays torch's first-use costs (kernels, allocator, AdamW) with one throw-away forward, backward and
    optimizer step of a block stage, so that a spare does not pay them during a recovery."""
    rt = StageRuntime(cfg, 1, device)
    x = torch.zeros(1, min(8, cfg.train.seq_len), cfg.model.d_model, device=device)
    rt.module(x.requires_grad_(True)).sum().backward()
    rt.optimizer.step()
