"""MLTP as a drop-in `transformers.Trainer`: change two names in a training script and it trains with MLTP.

    args = MLTPTrainingArguments(output_dir="out", per_device_train_batch_size=32, learning_rate=3e-4,
                                 mltp_variant="fc", mltp_gamma=0.5, mltp_alpha_scale=10.0)
    trainer = MLTPTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)

Batches. `per_device_train_batch_size` is B, the size of one task. The train loader yields 2B samples per
process (drop_last, so every batch splits into two equal tasks), and each loader batch is one pair: task i is
its first half, task j its second (SPEC.md, Batches). An optimizer step therefore consumes
2 * B * gradient_accumulation_steps * num_processes samples, and an epoch has half as many steps as a plain
Trainer with the same batch size. Sampler sharding, epoch counting and checkpoint resume are the Trainer's own,
since they count loader batches.

The gradient of one pair is the core's `mltp_backward`; the Trainer's `loss.backward()` is replaced by it in
`training_step`, everything else (clipping, optimizer and scheduler steps, logging, saving) is the Trainer's.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from .accelerate_utils import mltp_autocast
from .distributed import average_gradients, broadcast_buffers
from .errors import MLTPConfigError
from .mltp import MLTPConfig, alpha_from_optimizer, mltp_backward, split_tasks
from .selection import select_parameters, summarize_selection

__all__ = ["MLTPTrainer", "MLTPTrainingArguments"]

_logger = logging.getLogger("timm_mltp")

# MLTPStats fields logged as mltp_<name>, averaged over each logging interval
_LOGGED = ("loss_i", "loss_j", "grad_cosine", "alpha")


@dataclass
class MLTPTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what MLTP does each step (SPEC.md). Saved with the other arguments."""

    mltp_variant: str = field(default="full", metadata={"help": (
        "Parameters the inner step moves: none | full | conv | fc | fo | head, or comma-separated glob patterns "
        "over parameter names such as 'layer4.*,fc.*'.")})
    mltp_gamma: float = field(default=0.5, metadata={"help": "Weight of task j in (0, 1]."})
    mltp_alpha: float | None = field(default=None, metadata={"help": (
        "Fixed inner step size. None: follow the optimizer's current learning rate times mltp_alpha_scale.")})
    mltp_alpha_scale: float = field(default=1.0, metadata={"help": (
        "alpha = learning rate * mltp_alpha_scale when mltp_alpha is None. Adaptive optimizers (AdamW) take steps "
        "far larger than lr * gradient and want 10 to 100.")})
    mltp_second_order: str = field(default="auto", metadata={"help": (
        "auto | exact (double backward) | fd (finite differences, for kernels without double backward).")})
    mltp_bn_update: str = field(default="both", metadata={"help": (
        "BatchNorm running statistics: updated by both passes, or by the first (task i) only.")})

    def __post_init__(self):
        self.mltp_config  # noqa: B018 -- MLTPConfig validates variant, gamma, second_order and bn_update
        for name, value, allow_none in (("mltp_alpha", self.mltp_alpha, True),
                                        ("mltp_alpha_scale", self.mltp_alpha_scale, False)):
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise MLTPConfigError(f"{name} must be a finite number >= 0{' or None' if allow_none else ''}, "
                                      f"got {value!r}")
        super().__post_init__()

    @property
    def mltp_config(self) -> MLTPConfig:
        return MLTPConfig(variant=self.mltp_variant, gamma=self.mltp_gamma, second_order=self.mltp_second_order,
                          bn_update=self.mltp_bn_update)


def _returns_loss(model: torch.nn.Module) -> bool:
    """Whether forward takes labels (transformers models do): if not, it returns logits and the loss is ours."""
    params = inspect.signature(model.forward).parameters.values()
    return any("label" in p.name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class MLTPTrainer(Trainer):
    """`transformers.Trainer` that trains with MLTP; see the module docstring for how batches pair up.

    - Gradient accumulation: each pair's MLTP gradient is accumulated with weight 1/k, so the step's gradient
      is the mean of the k pairs' gradients. Each task's loss is its own mean (`num_items_in_batch` is not
      used): the inner step is then the plain gradient step on task i.
    - fp16: the pair's gradients are multiplied by the gradient scaler's scale, as `scaler.scale(loss)` would,
      while the inner step uses the unscaled gradient (`loss_scale=`); the scaler then unscales, and skips the
      step on inf/nan from either pass. bf16 and fp16 autocast come from Accelerate, as in the Trainer.
    - Multi-process (Accelerate/DDP): `mltp_backward` takes gradients with `torch.autograd.grad` on the
      unwrapped model, so DDP's hooks never fire; on the sync step each `.grad` is replaced by its mean over
      processes, and buffers (BatchNorm statistics) are broadcast from process 0, as DDP's forward would.
    - Models that return a loss (transformers) are trained through `compute_loss`. A plain module whose forward
      takes no labels (a timm model) gets the batch's inputs and cross-entropy against `labels`.
    """

    def __init__(self, model=None, args: MLTPTrainingArguments | None = None, *trainer_args, **trainer_kwargs):
        if args is None:
            args = MLTPTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, MLTPTrainingArguments):
            raise MLTPConfigError(f"MLTPTrainer needs MLTPTrainingArguments (a TrainingArguments subclass with the "
                                  f"mltp_* fields), got {type(args).__name__}")
        plain = model is not None and not _returns_loss(model)
        # Trainer.__init__ reads model.config for label smoothing, which a plain module lacks; for those our
        # cross-entropy applies args.label_smoothing_factor itself
        with _overridden(args, label_smoothing_factor=0.0) if plain else contextlib.nullcontext():
            super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise MLTPConfigError("MLTPTrainer supports single-process and data-parallel (DDP) training, not "
                                  "DeepSpeed or FSDP: the inner step needs every process to hold whole parameters")
        if args.optim in ("lomo", "adalomo"):
            raise MLTPConfigError(f"optim={args.optim!r} updates the weights inside backward, which MLTP replaces; "
                                  f"choose another optimizer")
        if args.n_gpu > 1:
            _logger.warning("MLTPTrainer does not use DataParallel: it runs on one of the %d visible GPUs. Launch one "
                            "process per GPU (torchrun / accelerate launch) to use them all.", args.n_gpu)
        self._mltp_config = args.mltp_config
        # a bad variant is an error now, not at the first step; the user sees what S holds
        selected = select_parameters(self.model, self._mltp_config.variant)
        _logger.info("MLTP variant %r: S holds %s", self._mltp_config.variant,
                     summarize_selection(self.model, selected))
        self._plain_module = not _returns_loss(self.model)  # (model_init: the model now exists)
        if self._plain_module:
            # prediction_step looks for these in the batch; nothing in forward's signature names them
            self.label_names = list(args.label_names or ["labels"])
        self._mltp_sums = [0.0] * (len(_LOGGED) + 1)  # sums of the logged stats over the interval, and the count

    # ---- batches: the loader yields both tasks of a step

    def get_train_dataloader(self):
        # 2B samples per process; drop_last since a short odd last batch cannot be split into two equal tasks
        with _overridden(self, _train_batch_size=2 * self._train_batch_size), \
                _overridden(self.args, dataloader_drop_last=True):
            loader = super().get_train_dataloader()
        if hasattr(loader, "__len__") and len(loader) == 0:
            raise MLTPConfigError(f"train_dataset is too small for one step: each process needs 2 * "
                                  f"per_device_train_batch_size = {2 * self._train_batch_size} samples "
                                  f"(task i and task j)")
        return loader

    def get_total_train_batch_size(self, args) -> int:
        return 2 * super().get_total_train_batch_size(args)  # samples per optimizer step: two tasks per pair

    def _remove_unused_columns(self, dataset, description=None):
        # A with_transform dataset builds the model inputs from raw columns (HF's image-classification example
        # sets remove_unused_columns=False for this); a plain module's signature says nothing about columns.
        if self._plain_module or dataset.format.get("type") == "custom":
            return dataset
        return super()._remove_unused_columns(dataset, description)

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        if self._plain_module:
            return data_collator
        return super()._get_collator_with_removed_columns(data_collator, description)

    # ---- one pair of tasks

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers
            self.optimizer.train()
        task_i, task_j = split_tasks(self._prepare_inputs(inputs))
        # what the Trainer's backward does to the loss: divide by the accumulation steps, scale for fp16
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scaler = self.accelerator.scaler
        loss_scale = (scaler.scale(torch.ones((), device=self.args.device)) if scaler is not None else 1.0) / steps
        # self.model, not the DDP-wrapped `model`: no forward through DDP, no reducer, no gradient hooks
        with self.compute_loss_context_manager(), mltp_autocast(self.accelerator, self.model):
            stats = mltp_backward(self.model, task_i, task_j, self._task_loss, self._mltp_config, self._alpha(),
                                  loss_scale=loss_scale)
        values = [stats[name] for name in _LOGGED]
        if all(map(math.isfinite, values)) or not self.args.logging_nan_inf_filter:  # fp16 overflow: as for "loss"
            self._mltp_sums = [total + v for total, v in zip(self._mltp_sums, values + [1])]
        if self.accelerator.sync_gradients:
            average_gradients(self.model.parameters())  # SPEC: the mean over processes of each one's MLTP gradient
            if self.args.ddp_broadcast_buffers is not False:
                broadcast_buffers(self.model)
        return torch.tensor(stats.loss / steps, device=self.args.device)

    def _alpha(self):
        if self.args.mltp_alpha is not None:
            return self.args.mltp_alpha
        # read every step, so alpha follows warmup and decay
        return alpha_from_optimizer(self.model, self.optimizer, self.args.mltp_alpha_scale)

    def _task_loss(self, module, task):
        # a copy: compute_loss pops labels (label smoothing), and `fd` evaluates task i more than once
        return self.compute_loss(module, dict(task))

    # ---- plain modules: logits in, our cross-entropy

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._plain_module:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        label = self.label_names[0]
        if label not in inputs:
            raise MLTPConfigError(f"the batch has no {label!r} for {type(self.model).__name__}, which returns "
                                  f"logits; its keys are {list(inputs)}. Name the label key with label_names=[...]")
        logits, labels = self._logits(model, inputs), inputs[label]
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(logits, labels, num_items_in_batch=num_items_in_batch)
        else:
            loss = F.cross_entropy(logits, labels, label_smoothing=self.args.label_smoothing_factor)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _logits(self, model, inputs):
        x = {k: v for k, v in inputs.items() if k not in self.label_names}
        return model(*x.values()) if len(x) == 1 else model(**x)  # a timm model takes one positional input

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self._plain_module or inputs.get(self.label_names[0]) is not None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        # unlabelled batch: the Trainer would call model(**inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = self._logits(model, self._prepare_inputs(inputs))
        return None, (None if prediction_loss_only else logits.detach()), None

    # ---- logging

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log: add the MLTP stats of its interval
            sums = self._mltp_sums
            if self.args.world_size > 1:  # every process logs here, as for "loss"
                sums = self.accelerator.reduce(torch.tensor(sums, device=self.args.device), reduction="sum").tolist()
            *totals, count = sums
            if count:
                logs.update({f"mltp_{name}": total / count for name, total in zip(_LOGGED, totals)})
            self._mltp_sums = [0.0] * len(self._mltp_sums)
        super().log(logs, *args, **kwargs)


@contextlib.contextmanager
def _overridden(obj, **attrs):
    """Set attributes for the duration of a Trainer call that reads them, then restore them."""
    saved = {name: getattr(obj, name) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)
