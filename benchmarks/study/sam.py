"""The SAM baseline (Foret et al. 2021) for both paths: the engine's Trainer and MLTPTrainer."""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch

from timm_mltp.accelerate_utils import mltp_autocast
from timm_mltp.engine import TrainArgs, Trainer
from timm_mltp.errors import MLTPConfigError
from timm_mltp.mltp import MLTPStats
from timm_mltp.passes import frozen_running_stats as _frozen_running_stats

from .settings import SAM_RHO


class SAMStep:
    """SAM's gradient (Foret et al. 2021, Algorithm 1) in place of MLTP's, in the loops written around
    `MLTPStep` (the engine's and MLTPTrainer's): both tasks form one batch of 2B. Syncing, clipping, the
    optimizer and the schedule stay the loop's, so a SAM run differs from `none` in the gradient alone."""

    def __init__(self, step, rho: float = SAM_RHO):
        if step.accelerator.scaler is not None:
            raise MLTPConfigError("SAMStep has no fp16 gradient-scaler path; use mixed_precision='bf16' or 'no'")
        if step.accelerator.num_processes > 1:
            raise MLTPConfigError("SAMStep runs on one process: e(w) would need the gradient averaged over "
                                  "processes before the climb")
        self.step, self.rho = step, rho
        self.inner_step = step.inner_step   # SAM leaves it untouched

    def state_dict(self) -> dict:           # the loop's checkpoints save the MLTP step's state
        return self.step.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.step.load_state_dict(state)

    def _loss(self, batch) -> torch.Tensor:
        with mltp_autocast(self.step.accelerator, self.step.model):
            return self.step.loss_fn(self.step.model, batch)

    def pair(self, batch, accumulation_steps: int = 1) -> MLTPStats:
        params = [p for p in self.step.model.parameters() if p.requires_grad]
        loss = self._loss(batch)
        grads = torch.autograd.grad(loss, params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        climb = torch._foreach_mul(grads, self.rho / (norm.item() + 1e-12))   # e(w) = rho g / ||g||
        with torch.no_grad():
            torch._foreach_add_(params, climb)              # to the local maximum w + e(w)
        try:
            with _frozen_running_stats(self.step.model):    # BatchNorm statistics from the pass at w only
                sharp = torch.autograd.grad(self._loss(batch), params)
        finally:
            with torch.no_grad():
                torch._foreach_sub_(params, climb)          # back to w
        for p, g in zip(params, sharp):                     # the loop's optimizer steps with the gradient at w + e(w)
            g = g / accumulation_steps
            p.grad = g if p.grad is None else p.grad + g
        value = loss.item()
        self.step.finite = self.step.finite and math.isfinite(value)
        nan = math.nan                                      # no tasks, no inner step
        return MLTPStats(loss=value, loss_i=nan, loss_j=nan, grad_cosine=nan, alpha=0.0, inner_step=0.0,
                         relative_step=nan, second_order="none")

    def sync(self) -> bool:
        return self.step.sync()

    def second_order(self) -> str:          # how the gradient was taken, for the engine's epoch rows: no H_i v
        return "none"

    def loss_scale(self) -> float:
        return self.step.loss_scale()


class SAMTrainer(Trainer):
    """An engine run whose gradient is SAM's: the engine's (timm's) SGD is SAM's base optimizer, and the data,
    schedule, weight decay, clipping and checkpoints are the ones MLTP runs get."""

    def __init__(self, args: TrainArgs, rho: float = SAM_RHO):
        super().__init__(replace(args, variant="none"))
        self.step = SAMStep(self.step, rho)


@functools.cache
def hf_trainer_class(method: str):
    """MLTPTrainer, or for `sam` the same Trainer stepping with SAM's gradient. Imported on first use:
    transformers takes seconds to load."""
    from timm_mltp.trainer import MLTPTrainer

    if method != "sam":
        return MLTPTrainer

    class SAMMLTPTrainer(MLTPTrainer):
        def _step(self):
            step = super()._step()
            if getattr(self, "_sam_step", None) is None or self._sam_step.step is not step:
                self._sam_step = SAMStep(step)
            return self._sam_step

    return SAMMLTPTrainer
