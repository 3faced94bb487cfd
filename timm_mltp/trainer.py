"""MLTP as a drop-in `transformers.Trainer`: change two names in a training script and it trains with MLTP.

    args = MLTPTrainingArguments(output_dir="out", per_device_train_batch_size=32, learning_rate=3e-4,
                                 mltp_variant="fc", mltp_gamma=0.5)
    trainer = MLTPTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)

Batches. `per_device_train_batch_size` is B, the size of one task. The train loader yields 2B samples per
process (drop_last, so every batch splits into two equal tasks), and each loader batch is one pair: task i is
its first half, task j its second (SPEC.md, Batches). An optimizer step therefore consumes
2 * B * gradient_accumulation_steps * num_processes samples, and an epoch has half as many steps as a plain
Trainer with the same batch size. Sampler sharding, epoch counting and checkpoint resume are the Trainer's own,
since they count loader batches.

The gradient of one pair comes from `MLTPStep` (the sequence the recipe's loop runs too); the Trainer's
`loss.backward()` is replaced by it in `training_step`, everything else (clipping, optimizer and scheduler
steps, logging, saving) is the Trainer's.

Preemption: SIGTERM or SIGUSR1 (SLURM's `--signal`) saves a checkpoint at the end of the step in progress and
ends `train()` (`PreemptionCallback`, which MLTPTrainer adds itself and any Trainer can take); resume with
`train(resume_from_checkpoint=True)`.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import has_length

from .checkpoints import refusing_pickle
from .errors import MLTPConfigError
from .mltp import MLTPConfig
from .preemption import PreemptionSignal, any_process, shield_loader_workers
from .selection import select_parameters, summarize_selection
from .step import MLTPStep
from .tasks import even_batch

__all__ = ["MLTPTrainer", "MLTPTrainingArguments", "PreemptionCallback"]

_logger = logging.getLogger("timm_mltp")

# MLTPStats fields logged as mltp_<name>, averaged over each logging interval
_LOGGED = ("loss_i", "loss_j", "grad_cosine", "alpha", "relative_step", "update_ratio", "second_order_share")
_STEP_FILE = "mltp_step.pt"   # the alpha rule's memory and the second order in use, beside the optimizer's state


@dataclass
class MLTPTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what MLTP does each step (SPEC.md). Saved with the other arguments."""

    mltp_variant: str = field(default="full", metadata={"help": (
        "Parameters the inner step moves: none | full | conv | fc | fo | head, or comma-separated glob patterns "
        "over parameter names such as 'layer4.*,fc.*'.")})
    mltp_gamma: float = field(default=0.5, metadata={"help": "Weight of task j in (0, 1]."})
    mltp_alpha_rule: str | None = field(default=None, metadata={"help": (
        "How the inner step size alpha is chosen each step: optimizer | lr | fixed | clip | update | relative | "
        "preconditioned | online "
        "(README). "
        "None: 'fixed' when mltp_alpha is given, else the default rule.")})
    mltp_alpha: float | None = field(default=None, metadata={"help": "Rule 'fixed': the inner step size."})
    mltp_alpha_scale: float = field(default=1.0, metadata={"help": (
        "Rules lr, clip, update: multiplies the inner step they give.")})
    mltp_relative_step: float = field(default=1e-3, metadata={"help": (
        "Rule relative: the inner step's length relative to the weights of S, ||alpha P_S g_i|| / ||w_S||.")})
    mltp_curvature_fraction: float = field(default=1.0, metadata={"help": (
        "Exact and fd: the Hessian-vector product H_i v from this random fraction of task i, in (0, 1]; 1 takes "
        "all of it. 0.25 roughly halves exact's cost where a pass costs in proportion to its batch (GPUs, larger "
        "images; README, Curvature from a sample).")})
    mltp_second_order: str = field(default="auto", metadata={"help": (
        "auto | exact (double backward) | fd (finite differences, for kernels without double backward).")})
    mltp_bn_update: str = field(default="both", metadata={"help": (
        "BatchNorm running statistics: updated by both passes, or by the first (task i) only.")})
    mltp_auto_timing: bool = field(default=False, metadata={"help": (
        "mltp_second_order='auto': also time one step of exact and of fd where fd is accurate, and keep fd where "
        "faster. The choice then depends on the machine's load, so a seed's run may not repeat; off, auto keeps "
        "exact wherever double backward works.")})

    def __post_init__(self):
        self.mltp_config  # noqa: B018 -- MLTPConfig checks every mltp_* field
        if self.train_sampling_strategy == "batch_rebalance":
            raise MLTPConfigError("train_sampling_strategy='batch_rebalance' builds batches of B samples, but MLTP "
                                  "needs each loader batch to hold 2B (task i and task j); use 'random', "
                                  "'sequential' or 'group_by_length'")
        super().__post_init__()

    @property
    def mltp_config(self) -> MLTPConfig:
        rule = self.mltp_alpha_rule or ("fixed" if self.mltp_alpha is not None else MLTPConfig.alpha_rule)
        return MLTPConfig(variant=self.mltp_variant, gamma=self.mltp_gamma, second_order=self.mltp_second_order,
                          bn_update=self.mltp_bn_update, alpha_rule=rule, alpha=self.mltp_alpha,
                          alpha_scale=self.mltp_alpha_scale, relative_step=self.mltp_relative_step,
                          curvature_fraction=self.mltp_curvature_fraction, auto_timing=self.mltp_auto_timing)


class PreemptionCallback(TrainerCallback):
    """SIGTERM or SIGUSR1 during `train()`: at the end of the step in progress the Trainer saves a checkpoint
    (checkpoint-STEP, whatever `save_strategy` says) and stops, on every process after the same step (a reduce
    agrees on it). `preempted` then names the signal: exit with `timm_mltp.preemption.PREEMPTED_EXIT_CODE` so a
    scheduler requeues the job, and resume with `train(resume_from_checkpoint=True)`.

    MLTPTrainer adds one itself (`trainer.preemption`); add one to a plain Trainer with
    `Trainer(..., callbacks=[PreemptionCallback()])`."""

    def __init__(self):
        self.signal = PreemptionSignal()
        self.preempted: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.preempted = None
        self.signal.received = None
        self.signal.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if any_process(self.signal.received is not None, args.device):
            self.preempted = self.signal.received or "another process was signalled"
            control.should_save = control.should_training_stop = True
            _logger.warning("%s: saving checkpoint-%d in %s and stopping; resume with "
                            "train(resume_from_checkpoint=True)", self.preempted, state.global_step, args.output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        self.signal.__exit__()


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
        # transformers 5 calls it activation_checkpointing; gradient_checkpointing is its older name
        checkpointing = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing",
                                                                                  False)
        if checkpointing and args.mltp_variant != "none":
            raise MLTPConfigError("activation (gradient) checkpointing cannot be combined with MLTP: the forward "
                                  "passes it recomputes during backward would see w instead of w' and give a wrong "
                                  "gradient; turn it off (a smaller per_device_train_batch_size or "
                                  "gradient_accumulation_steps save memory too)")
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
        self._mltp_sums = [0.0] * (2 * len(_LOGGED))  # sums of the logged stats over the interval, and counts
        self._logged_second_order: str | None = None   # logged as mltp_second_order when it first settles
        self._mltp_step: MLTPStep | None = None   # built with the optimizer, at the first step
        self._step_state: dict | None = None  # restored from a checkpoint before the first step
        self.preemption = next((c for c in self.callback_handler.callbacks if isinstance(c, PreemptionCallback)),
                               None)
        if self.preemption is None:
            self.preemption = PreemptionCallback()
            self.add_callback(self.preemption)

    # ---- batches: the loader yields both tasks of a step

    def get_train_dataloader(self):
        # 2B samples per process; drop_last since a short odd last batch cannot be split into two equal tasks
        with _overridden(self, _train_batch_size=2 * self._train_batch_size), \
                _overridden(self.args, dataloader_drop_last=True):
            loader = super().get_train_dataloader()
        shield_loader_workers(loader)   # SIGTERM/SIGUSR1 stop training after the step; they must not kill workers
        if has_length(loader) and len(loader) == 0:   # (an IterableDataset has no length)
            raise MLTPConfigError(f"train_dataset is too small for one step: each process needs 2 * "
                                  f"per_device_train_batch_size = {2 * self._train_batch_size} samples "
                                  f"(task i and task j)")
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        loader = super().get_eval_dataloader(eval_dataset)
        shield_loader_workers(loader)
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
        step = self._step()
        batch = even_batch(self._prepare_inputs(inputs))   # an IterableDataset's last batch may be odd
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        stats = None
        if batch is not None:
            with self.compute_loss_context_manager():
                stats = step.pair(batch, accumulation_steps=steps)
            self._log_stats(stats)
        if self.accelerator.sync_gradients:
            step.sync()   # a skipped step: the Trainer's optimizer.step() then changes nothing (module docstring)
        return torch.tensor(stats.loss / steps if stats else 0.0, device=self.args.device)

    def _step(self) -> MLTPStep:
        # self.model, not the DDP-wrapped model: no forward through DDP, no reducer, no gradient hooks
        if self._mltp_step is None or self._mltp_step.inner_step.optimizer is not self.optimizer:
            self._mltp_step = MLTPStep(self.accelerator, self.model, self.optimizer, self._mltp_config,
                                       self._task_loss, max_grad_norm=self.args.max_grad_norm,
                                       broadcast_buffers=self.args.ddp_broadcast_buffers is not False)
            if self._step_state is not None:
                self._mltp_step.load_state_dict(self._step_state)
        return self._mltp_step

    def _log_stats(self, stats) -> None:
        for k, name in enumerate(_LOGGED):   # fp16 overflow, no update yet: left out, as the Trainer does for "loss"
            if math.isfinite(stats[name]) or not self.args.logging_nan_inf_filter:
                self._mltp_sums[2 * k] += stats[name]
                self._mltp_sums[2 * k + 1] += 1

    # ---- checkpoints: the MLTP step's state (alpha rule, second order) goes beside the optimizer's

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self._mltp_step is not None and self.args.should_save:
            torch.save(self._mltp_step.state_dict(), os.path.join(output_dir, _STEP_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        # the Trainer's files and ours hold tensors and plain types only: one that needs pickle is refused
        with refusing_pickle(checkpoint, "resume_from_checkpoint", opt_in=None):
            super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, _STEP_FILE) if checkpoint else None
        if path and os.path.isfile(path):
            with refusing_pickle(path, "resume_from_checkpoint", opt_in=None):
                self._step_state = torch.load(path, weights_only=True)
            if self._mltp_step is not None:
                self._mltp_step.load_state_dict(self._step_state)
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
            logs.update({f"mltp_{name}": sums[2 * k] / sums[2 * k + 1]
                         for k, name in enumerate(_LOGGED) if sums[2 * k + 1]})
            self._mltp_sums = [0.0] * len(self._mltp_sums)
            self._log_second_order(logs)
        super().log(logs, *args, **kwargs)

    def _log_second_order(self, logs: dict) -> None:
        """How the gradient is taken (none | first | exact | fd), in the first training log and whenever it
        changes (auto settles on its first step): once, not every line, since trackers take numbers."""
        second_order = self._mltp_step.second_order() if self._mltp_step is not None else None
        if second_order not in (None, "auto", self._logged_second_order):
            logs["mltp_second_order"] = self._logged_second_order = second_order


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
