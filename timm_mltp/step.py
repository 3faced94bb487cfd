"""The MLTP part of one optimizer step, for any training loop built on Accelerate.

The recipe's loop (engine.py) and MLTPTrainer run the same sequence through this one class:

    for batch in the step's loader batches:        # k pairs with gradient accumulation
        stats = step.pair(batch, accumulation_steps=k)   # loss scale, autocast, mltp_backward (weight 1/k)
    if step.sync():                                # mean over processes, buffers, agreement on finiteness
        clip (after unscaling); optimizer.step()
    else: the step is skipped by every process, and an fp16 scaler backs off

A skipped step restores the running statistics its passes changed, and leaves the gradients so that the
loop's own `optimizer.step()` is harmless: none at all (the optimizer skips parameters without one), or,
under an fp16 gradient scaler, non-finite ones, so that the scaler skips the step and lowers its scale, as
PyTorch's AMP recipe does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from .accelerate_utils import mltp_autocast
from .distributed import average_gradients, broadcast_buffers, value_of_process_zero
from .inner_step import InnerStepSize
from .mltp import MLTPConfig, MLTPStats, mltp_backward, second_order_in_use
from .tasks import split_tasks


_SETTLED = ("exact", "fd")   # what `auto` settles on


class MLTPStep:
    """One model's MLTP steps under one Accelerator. `model` is the plain module (not DDP-wrapped): the
    passes take each process's own gradient, without DDP's hooks (SPEC.md, Multi-process training)."""

    def __init__(self, accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: MLTPConfig,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor], max_grad_norm: float | None = None,
                 broadcast_buffers: bool = True):
        self.accelerator, self.model, self.cfg, self.loss_fn = accelerator, model, cfg, loss_fn
        self.inner_step = InnerStepSize(cfg, model, optimizer, max_grad_norm)
        self.broadcast = broadcast_buffers
        self.finite = True          # every pair of this step so far had a finite loss
        self._buffers: dict[str, torch.Tensor] | None = None   # running statistics before this step's passes

    def loss_scale(self) -> float:
        """The fp16 gradient scaler's current scale (1 without one); `scaler.scale` also initialises it."""
        scaler = self.accelerator.scaler
        if scaler is None:
            return 1.0
        return float(scaler.scale(torch.ones((), device=self.accelerator.device)))

    def pair(self, batch, accumulation_steps: int = 1) -> MLTPStats:
        """Accumulate one loader batch's MLTP gradient, weighted 1/k, into `.grad`; return its stats."""
        task_i, task_j = split_tasks(batch)
        if self._buffers is None:   # a skipped step must not leave the statistics of non-finite passes behind
            self._buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        with mltp_autocast(self.accelerator, self.model):
            stats = mltp_backward(self.model, task_i, task_j, self.loss_fn, self.cfg, self.inner_step.alpha(),
                                  loss_scale=self.loss_scale() / accumulation_steps)
        self.finite = self.finite and math.isfinite(stats.loss)
        self.inner_step.observe(stats.grad_cosine)
        if self.cfg.second_order == "auto":
            self._settle()
        return dataclasses.replace(stats, update_ratio=self.inner_step.update_ratio(stats.inner_step))

    def _settle(self) -> None:
        """Once `auto` has settled on process 0 (it measures, so processes can differ, and a step with alpha = 0
        settles nothing), every process goes on with process 0's choice, which a resumed run keeps too
        (state_dict). Every process calls this on every step until then: one small broadcast."""
        choices = ("auto", *_SETTLED)
        local = second_order_in_use(self.model, self.cfg)
        if local not in choices:     # variants none and fo: no second order to settle (on every process)
            return
        chosen = choices[value_of_process_zero(choices.index(local), self.accelerator.device)]
        if chosen in _SETTLED:
            self._settle_on(chosen)

    def second_order(self) -> str:
        """How the gradient is taken now: none | first | exact | fd, or auto before it has settled. The same on
        every process (process 0's choice)."""
        return second_order_in_use(self.model, self.cfg)

    def state_dict(self) -> dict:
        """What a resumed run needs to take the same steps: the alpha rule's memory, the second order in use."""
        return {"inner_step": self.inner_step.state_dict(), "second_order": self.second_order()}

    def load_state_dict(self, state: dict) -> None:
        self.inner_step.load_state_dict(state["inner_step"])
        if self.cfg.second_order == "auto" and state.get("second_order") in _SETTLED:
            self._settle_on(state["second_order"])

    def _settle_on(self, second_order: str) -> None:
        """Go on with `second_order` (exact or fd) instead of auto: nothing left to measure or time."""
        self.cfg = dataclasses.replace(self.cfg, second_order=second_order, auto_timing=False)

    def sync(self) -> bool:
        """After the last pair of an optimizer step. False: skip this step (every process agrees)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        average_gradients(params)           # SPEC: the mean over processes of each one's MLTP gradient
        if self.broadcast:
            broadcast_buffers(self.model)   # BatchNorm statistics follow process 0, as with DDP
        bad = torch.tensor([0.0 if self.finite else 1.0], device=self.accelerator.device)
        skip = self.accelerator.reduce(bad, reduction="sum").item() > 0
        buffers, self._buffers, self.finite = self._buffers or {}, None, True
        if skip:
            with torch.no_grad():
                for n, b in self.model.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
            if self.accelerator.scaler is not None:
                for p in params:            # the scaler finds inf, skips the step and backs off
                    if p.grad is not None:
                        p.grad.fill_(math.inf)
            else:
                for p in params:
                    p.grad = None
            return False
        self.inner_step.before_optimizer_step()
        return True
