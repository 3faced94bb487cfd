"""A small Accelerate train/evaluate engine for timm models with MLTP; recipes/train.py is its CLI.

Build with timm's factories (build.py), distribute with Accelerate, get the gradient from the core:

    for pairs in accumulation_groups(loader, k):       # k loader batches of 2B samples: task i, then task j
        for batch in pairs:                            # mixup within each task; this process's MLTP gradient,
            step.pair(batch, accumulation_steps=k)     # weighted 1/k (loss scale, autocast)
        if step.sync():                                # mean over processes; every process skips a non-finite step
            clip; optimizer.step(); ema.update(model)  # the EMA follows the outer weights, never w'
        count unreadable samples; on SIGTERM/SIGUSR1 (any process): save last.pth.tar, stop (preemption.py)
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType, LoggerType, send_to_device, set_seed
from timm.models import model_parameters
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad
from tqdm.auto import tqdm
from transformers.trainer_utils import enable_full_determinism

from .build import build_ema, build_run, build_scheduler, compile_model
from .checkpoints import CheckpointSaver, load_checkpoint_file, rng_state, set_rng_state
from .data import DEFAULT_DATASET, check_unreadable_share, mix_within_tasks
from .errors import MLTPConfigError
from .preemption import Preempted, PreemptionSignal, any_process
from .step import MLTPStep
from .train_args import TrainArgs

# the MLTP statistics averaged over each epoch (MLTPStats fields)
EPOCH_STATS = ("loss", "loss_i", "loss_j", "grad_cosine", "alpha", "relative_step", "update_ratio",
               "second_order_share")
SUMMARY_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", *EPOCH_STATS[1:],
                   "second_order",                    # how the gradient was taken: none | first | exact | fd
                   "train_skipped", "eval_skipped"]   # unreadable samples replaced in the epoch (data.SkipUnreadable)


# ---- the run's surroundings: distribution, output folder, trackers -----------------------------------

def check_distributed_type(accelerator: Accelerator) -> None:
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                        DistributedType.MEGATRON_LM):
        raise MLTPConfigError(f"the recipe supports single-process and data-parallel (DDP) training, not "
                              f"{accelerator.distributed_type.value}: the inner step needs every process to hold "
                              f"whole parameters; run `accelerate config` again and choose multi-GPU (DDP)")


def output_dir(args: TrainArgs) -> Path:
    name = args.experiment or "-".join([time.strftime("%Y%m%d-%H%M%S"), args.model,
                                        args.variant.replace(",", "+").replace("*", "x")])
    return Path(args.output) / name


def build_accelerator(args: TrainArgs, out_dir: Path) -> Accelerator:
    """Accelerate from the run options; --log-with trackers are optional packages, checked here."""
    available = {str(t) for t in get_available_trackers()}
    for name in args.log_with or ():
        if name not in LoggerType.list():
            raise MLTPConfigError(f"--log-with {name!r} is not an Accelerate tracker; choose from "
                                  f"{', '.join(LoggerType.list())}")
        if name != "all" and name not in available:
            raise MLTPConfigError(f"--log-with {name}: the {name} package is not installed; pip install {name}")
    # several CPU processes (torchrun): Accelerate sets up gloo only when told it is on the CPU
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu or cpu_processes,
                       log_with=list(args.log_with) if args.log_with else None,
                       project_dir=str(out_dir) if args.log_with else None)


def seed_run(args: TrainArgs) -> None:
    """Seed every generator; --deterministic also asks for deterministic kernels, as Hugging Face's
    `full_determinism` does (the same call)."""
    if args.deterministic:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def tracker_config(args: TrainArgs) -> dict:
    """The run's options as trackers take hyper-parameters: numbers, strings and booleans only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(args).items()}


def accumulation_groups(loader, k: int):
    """Consecutive groups of k loader batches, one optimizer step each (the last one of an epoch may be
    shorter, as in timm's train.py)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


# ---- the loop --------------------------------------------------------------------------------------

class Trainer:
    """One training run: built (and checked) in __init__, run by `fit()`.

    `accelerator`: one built by the caller (another mixed-precision setup, a custom gradient scaler);
    default: from `args.mixed_precision`, `args.cpu` and `args.log_with`.
    """

    def __init__(self, args: TrainArgs, accelerator: Accelerator | None = None):
        self.args = args
        self.out_dir = output_dir(args)
        self.accelerator = acc = accelerator or build_accelerator(args, self.out_dir)
        check_distributed_type(acc)
        seed_run(args)

        # build: the options become the run's pieces in one place (build.py)
        run = build_run(args, acc)
        self.mltp, self.selection, self.streamed = run.mltp, run.selection, run.streamed
        self.weights_note, self.selection_note = run.weights_note, run.selection_note
        self.scheduler, self.num_epochs, self.updates_per_epoch = run.scheduler, run.num_epochs, run.updates_per_epoch
        self.mixup, self.train_loss = run.mixup, run.train_loss
        self.train_set, self.train_size = run.loaders.train.dataset, run.loaders.train_size
        self.shuffle_generator = run.loaders.shuffle_generator

        # prepare: Accelerate places the model and gives each process its batches of a map-style split; a stream's
        # loaders already read this process's own part (prepare_batch places their batches)
        if run.streamed:
            self.model, self.optimizer = acc.prepare(run.model, run.optimizer)
            self.train_loader, self.eval_loader = run.loaders.train, run.loaders.eval
        else:
            self.model, self.optimizer, self.train_loader = acc.prepare(run.model, run.optimizer, run.loaders.train)
            self.eval_loader = acc.prepare(run.loaders.eval) if run.loaders.eval is not None else None
        # the MLTP passes run on the plain module: each process's own gradient, no DDP hooks (SPEC)
        self.module = acc.unwrap_model(self.model)
        self.ema = build_ema(args, self.module)
        compile_model(args, self.module)

        # the step and the loop's state
        self.step = MLTPStep(acc, self.module, self.optimizer, self.mltp, self.loss_fn,
                             max_grad_norm=args.clip_grad if args.clip_mode == "norm" else None,
                             broadcast_buffers=not args.no_ddp_bb)
        # timm: without an eval split, checkpoints are ranked by the training loss
        self.eval_metric = args.eval_metric if self.eval_loader is not None else "loss"
        self.saver = CheckpointSaver(self.out_dir, args.checkpoint_hist, decreasing=self.eval_metric == "loss")
        self.show_bar = args.progress and acc.is_local_main_process and sys.stderr.isatty()
        self.epoch, self.step_in_epoch, self.num_updates = 0, 0, 0
        self.rows, self.epoch_sums, self.epoch_skipped = [], {}, 0
        self.preemption = PreemptionSignal()   # active during fit()
        if args.resume:
            self.load_checkpoint(args.resume)

    # -- logging and files
    def print(self, *a) -> None:
        if not self.accelerator.is_main_process:
            return
        line = " ".join(str(x) for x in a)
        if self.show_bar:
            tqdm.write(line, file=sys.stdout)   # above the bar, not through it
        else:
            print(line, flush=True)

    def checkpoint_state(self) -> dict:
        scaler = self.accelerator.scaler
        ema = {"state_dict_ema": self.ema.module.state_dict()} if self.ema is not None else {}
        return {"arch": self.args.model, "state_dict": self.module.state_dict(), **ema,
                "optimizer": self.optimizer.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "num_updates": self.num_updates,
                "rows": self.rows, "epoch_sums": self.epoch_sums, "epoch_skipped": self.epoch_skipped,
                "mltp_step": self.step.state_dict(),
                # what a resume on another number of processes converts from (load_checkpoint)
                "processes": self.accelerator.num_processes, "updates_per_epoch": self.updates_per_epoch,
                "args": asdict(self.args)}

    def save(self, kind: str, **where) -> bool:
        """kind: last | recovery (where: epoch, step) | epoch (where: epoch, metric). True: a new best epoch."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return False
        state = self.checkpoint_state()
        if kind == "recovery":
            self.saver.save_recovery(state, **where)
        elif kind == "epoch" and where["metric"] is not None:
            return self.saver.save_checkpoint(state, **where)
        else:
            self.saver.save_last(state)
        return False

    def load_checkpoint(self, path: str) -> None:
        ckpt = load_checkpoint_file(path, "--resume", trust=self.args.trust_checkpoint)
        if ckpt.get("arch") != self.args.model:
            raise MLTPConfigError(f"--resume {path!r} is a checkpoint of {ckpt.get('arch')!r}, not {self.args.model!r}")
        self.module.load_state_dict(ckpt["state_dict"])
        if self.ema is not None:   # timm: the EMA resumes from state_dict_ema, else from the model's weights
            self.ema.module.load_state_dict(ckpt.get("state_dict_ema", ckpt["state_dict"]))
        if not self.args.no_resume_opt:
            self.optimizer.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"] is not None and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(ckpt["scaler"])
            self.step.load_state_dict(ckpt["mltp_step"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        for key in ("epoch", "step_in_epoch", "num_updates", "rows", "epoch_sums"):
            setattr(self, key, ckpt[key])
        self.epoch_skipped = ckpt.get("epoch_skipped", 0)
        if "saver" in ckpt:
            self.saver.load_state_dict(ckpt["saver"])
        self.print(f"resumed from {path}: epoch {self.epoch}, step {self.step_in_epoch}")
        source = self.args.dataset or self.args.data_dir
        if self.streamed and not Path(source.partition("/")[2]).exists():
            self.print(f"{source} is streamed from the Hub or a URL: the resume is exact only if its files have not "
                       f"changed since the checkpoint")
        processes = ckpt.get("processes", self.accelerator.num_processes)
        if processes != self.accelerator.num_processes:
            self.continue_on_other_processes(processes, ckpt["updates_per_epoch"], ckpt["scheduler"])

    def continue_on_other_processes(self, before: int, updates_before: int, schedule: dict) -> None:
        """A checkpoint of `before` processes resumed on another number. Kept exactly: the weights, the optimizer,
        the samples of the epoch taken so far (the step counters are converted through them) and the schedule's
        position (its lengths in updates are the new run's, the rest is the checkpoint's). Not kept, and said in
        one line: which samples the rest of the epoch takes in which order."""
        now, pair = self.accelerator.num_processes, 2 * self.args.batch_size
        taken = self.step_in_epoch * pair * before            # samples of this epoch taken, all processes together
        self.step_in_epoch = taken // (pair * now)            # whole steps; the rest of a step is taken again
        again = taken - self.step_in_epoch * pair * now
        k = self.args.grad_accum_steps
        self.num_updates = self.epoch * self.updates_per_epoch + math.ceil(self.step_in_epoch / k)
        # the schedule's lengths in updates follow the updates per epoch: the new run's where they differ
        stand_in = torch.optim.SGD([{**{k: v for k, v in group.items() if k != "params"}, "params": [torch.zeros(1)]}
                                    for group in self.optimizer.param_groups])
        lengths_before = build_scheduler(self.args, stand_in, updates_before)[0].state_dict()
        lengths_now = self.scheduler.state_dict()
        self.scheduler.load_state_dict({k: lengths_now[k] if lengths_before.get(k) != lengths_now[k] else v
                                        for k, v in schedule.items()})
        self.scheduler.step_update(num_updates=self.num_updates)
        if self.streamed:
            rest = (f"the stream is now split into {now} part(s) instead of {before}, each read from its start past "
                    f"its first {self.step_in_epoch * pair} samples, so samples of this epoch may be taken twice or "
                    f"not at all")
        else:
            rest = f"the same samples in the same order, {now} batches of {pair} per step instead of {before}"
            rest += f", {again} of them taken again" if again else ""
        self.print(f"resumed on {now} process(es) a run of {before}: kept the weights, optimizer, schedule and the "
                   f"{taken} samples of epoch {self.epoch} taken (now step {self.step_in_epoch}, update "
                   f"{self.num_updates}); not kept: the order of the rest of epoch {self.epoch}: {rest}")

    def write_args(self) -> None:
        """args.yaml, as timm writes it; `recipes/train.py -c args.yaml` runs the same options again."""
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "args.yaml", "w") as f:
                yaml.safe_dump(asdict(self.args), f, sort_keys=False)

    def write_summary(self) -> None:
        if self.accelerator.is_main_process:
            with open(self.out_dir / "summary.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows)

    def log_step(self, update_idx: int, stats: dict, sums: dict, update_time: AverageMeter,
                 data_time: AverageMeter, samples: int) -> None:
        """timm train.py's log line, plus the MLTP statistics; the same values go to the trackers."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        lr = sum(lrs) / len(lrs)
        rate, rate_avg = samples / update_time.val, samples / update_time.avg
        self.print(f"Train: {self.epoch} [{update_idx:>4d}/{self.updates_per_epoch} "
                   f"({100 * (update_idx + 1) / self.updates_per_epoch:>3.0f}%)]  "
                   f"Loss: {stats['loss']:#.3g} ({_mean(sums['loss']):#.3g})  "
                   f"Time: {update_time.val:.3f}s, {rate:>7.2f}/s  ({update_time.avg:.3f}s, {rate_avg:>7.2f}/s)  "
                   f"LR: {lr:.3e}  Data: {data_time.val:.3f} ({data_time.avg:.3f})  "
                   f"cos: {stats.get('grad_cosine', math.nan):.3f}  "
                   f"rel_step: {stats.get('relative_step', math.nan):.1e}")
        self.accelerator.log({"train/loss": stats["loss"], "train/lr": lr, "train/samples_per_second": rate,
                              "train/data_time": data_time.val,
                              **{f"mltp/{k}": stats[k] for k in EPOCH_STATS[1:] if k in stats}},
                             step=self.num_updates)
        if self.args.save_images and self.accelerator.is_main_process:
            from torchvision.utils import save_image
            save_image(self.last_images, self.out_dir / f"train-batch-{update_idx}.jpg", padding=0, normalize=True)

    # -- steps
    def loss_fn(self, module, batch):
        """The training loss of one task (MLTP calls it for task i at w and task j at w')."""
        images, targets = batch
        return self.train_loss(module(images), targets)

    def prepare_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One loader batch as the MLTP step takes it: mixup/cutmix within each task, the memory layout."""
        batch = send_to_device(batch, self.accelerator.device)   # a stream's batches (Accelerate placed the others)
        images, targets = batch["pixel_values"], batch["labels"]
        if self.mixup is not None:
            images, targets = mix_within_tasks(self.mixup, images, targets)
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.args.save_images:
            self.last_images = images
        return images, targets

    def clip_gradients(self) -> None:
        """timm's clipping (norm, value or agc) of the unscaled gradient."""
        if not self.args.clip_grad:
            return
        self.accelerator.unscale_gradients()
        dispatch_clip_grad(model_parameters(self.module, exclude_head=self.args.clip_mode == "agc"),
                           value=self.args.clip_grad, mode=self.args.clip_mode)

    def train_step(self, *batches) -> dict | None:
        """One optimizer step on one or more loader batches of 2B samples (--grad-accum-steps): the mean of
        their MLTP gradients. None when a loss was not finite (every process skips the step); `skipped` when
        an fp16 gradient scaler found inf/nan gradients and backed off."""
        acc = self.accelerator
        self.optimizer.zero_grad(set_to_none=True)
        pairs = [self.step.pair(self.prepare_batch(batch), accumulation_steps=len(batches)) for batch in batches]
        stats = _mean_stats(pairs)
        if not getattr(self, "_reported", False):
            self._reported = True
            self.print(f"second order in use: {stats['second_order']}")
        if not self.step.sync():
            self.optimizer.step()   # no gradients, or inf ones that make the fp16 scaler skip it and back off
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.clip_gradients()
        self.optimizer.step()                          # through the fp16 scaler when there is one
        if acc.optimizer_step_was_skipped:
            return {**stats, "skipped": True}
        self.num_updates += 1
        if self.ema is not None:
            self.ema.update(self.module, step=self.num_updates)   # the outer weights, after the step
        self.scheduler.step_update(num_updates=self.num_updates)
        return {**stats, "skipped": False}

    def train_epoch(self) -> dict:
        args, acc = self.args, self.accelerator
        self.model.train()
        if self.mixup is not None and args.mixup_off_epoch and self.epoch >= args.mixup_off_epoch:
            self.mixup.mixup_enabled = False
        loader = self.epoch_loader()
        if not self.step_in_epoch:   # the epoch's running means and counts; a checkpoint carries them over a resume
            self.epoch_sums = {k: [0.0, 0] for k in EPOCH_STATS}
            self.epoch_skipped = 0
        sums, bad_in_row, k = self.epoch_sums, 0, args.grad_accum_steps
        update_time, data_time = AverageMeter(), AverageMeter()
        bar = tqdm(total=self.updates_per_epoch, initial=self.step_in_epoch // k, leave=False,
                   desc=f"epoch {self.epoch}", disable=not self.show_bar)
        last_time = time.time()
        for pairs in self.until_preempted(accumulation_groups(loader, k)):
            data_time.update(time.time() - last_time)
            stats = self.train_step(*pairs)
            self.step_in_epoch += len(pairs)
            self.count_unreadable(pairs)
            update_idx = math.ceil(self.step_in_epoch / k) - 1
            bar.update()
            if stats is None:
                bad_in_row += 1
                self.print(f"step {self.num_updates}: non-finite loss, step skipped ({bad_in_row} in a row)")
                if bad_in_row >= args.max_bad_steps:
                    raise MLTPConfigError(f"{bad_in_row} non-finite losses in a row at epoch {self.epoch}; stopped. "
                                          f"Lower --lr or --alpha-scale, or use --clip-grad; the last checkpoint "
                                          f"in {self.out_dir} is intact (--resume it)")
                last_time = time.time()
                continue
            bad_in_row = 0
            if stats.get("skipped"):
                self.print(f"step {self.num_updates}: fp16 gradient overflow, step skipped; loss scale now "
                           f"{self.step.loss_scale():g}")
            for key in EPOCH_STATS:
                if math.isfinite(stats.get(key, math.nan)):   # update_ratio is nan before the first update
                    sums[key][0] += stats[key]
                    sums[key][1] += 1
            update_time.update(time.time() - last_time)
            last_batch = self.step_in_epoch >= len(self.train_loader)
            if update_idx % args.log_interval == 0 or last_batch:
                samples = 2 * args.batch_size * len(pairs) * acc.num_processes
                self.log_step(update_idx, stats, sums, update_time, data_time, samples)
            if args.checkpoint_interval and self.num_updates % args.checkpoint_interval == 0:
                self.save("last")
            if args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
                self.save("recovery", epoch=self.epoch, step=update_idx)
            last_time = time.time()
        bar.close()
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return {k: _mean(v) for k, v in sums.items()}

    def epoch_loader(self):
        """The training loader of this epoch from batch `step_in_epoch` on. The epoch's order and each sample's
        augmentation depend on (seed, epoch, position) alone, so a resumed run sees the same batches, whatever
        the loader prefetched or the workers drew before."""
        if self.streamed:
            self.train_set.set_epoch(self.epoch)
            self.train_set.start_batch = self.step_in_epoch   # the samples before it are read past, not decoded
            return self.train_loader
        self.shuffle_generator.manual_seed(self.args.seed + self.epoch)
        self.train_loader.set_epoch(self.epoch)
        self.train_set.epoch = self.epoch
        if self.step_in_epoch:                      # resumed mid-epoch
            return self.accelerator.skip_first_batches(self.train_loader, self.step_in_epoch)
        return self.train_loader

    def count_unreadable(self, batches) -> None:
        """Add the step's unreadable samples, over all processes, to the epoch's count (too many end the run)."""
        local = sum(int(batch["skipped"].sum()) for batch in batches if "skipped" in batch)
        total = self.accelerator.reduce(torch.tensor(local, device=self.accelerator.device), reduction="sum")
        self.epoch_skipped += int(total.item())
        check_unreadable_share(self.args.train_split or "train", self.epoch_skipped, self.train_size,
                               self.args.max_bad_share)

    def until_preempted(self, steps):
        """The epoch's steps; after each one (its checkpoints written, before the next batch is loaded), every
        process stops together when any of them received SIGTERM or SIGUSR1."""
        for step in steps:
            yield step
            self.stop_if_preempted()

    def stop_if_preempted(self) -> None:
        """Called by every process at the same point: when any was signalled, save last.pth.tar as the run stands
        (mid-epoch: --resume continues from the next step), say so, and raise Preempted."""
        if not any_process(self.preemption.received is not None, self.accelerator.device):
            return
        self.save("last")
        path = self.out_dir / "last.pth.tar"
        message = (f"{self.preemption.received or 'another process was signalled'}: stopped after optimizer step "
                   f"{self.num_updates} (epoch {self.epoch}, batch {self.step_in_epoch}) and saved {path}; run the "
                   f"same command with --resume {path} to continue")
        self.print(message)
        self.accelerator.end_training()
        raise Preempted(message, path)

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module | None = None) -> dict:
        """Loss and top-1/top-5 accuracy of `module` (default: the model) on the eval split."""
        acc, module = self.accelerator, module if module is not None else self.module
        module.eval()
        losses, top1, top5, n, skipped = 0.0, 0.0, 0.0, 0, 0
        for batch in self.eval_loader:
            batch = send_to_device(batch, acc.device)   # a stream's batches (Accelerate placed the others)
            images = batch["pixel_values"]
            if self.args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with acc.autocast():
                logits = module(images)
            logits, labels = logits.float(), batch["labels"]
            unreadable = batch.get("skipped", torch.zeros_like(labels))   # per sample: replacements it made
            if not self.streamed:
                # the processes' batches of the split, its padding dropped: the padding repeats the split's first
                # samples, and an unreadable one among them would otherwise count twice
                logits, labels, unreadable = acc.gather_for_metrics((logits, labels, unreadable))
            k = min(5, logits.shape[1])
            a1, a5 = accuracy(logits, labels, topk=(1, k))
            losses += F.cross_entropy(logits, labels, reduction="sum").item()
            top1, top5, n = top1 + a1.item() * len(labels), top5 + a5.item() * len(labels), n + len(labels)
            skipped += int(unreadable.sum())
        if self.streamed:   # each process evaluated its own part of the stream
            sums = acc.reduce(torch.tensor([losses, top1, top5, n, skipped], dtype=torch.float64, device=acc.device),
                              "sum")
            losses, top1, top5, n, skipped = sums.tolist()
            skipped = int(skipped)
        check_unreadable_share(self.args.eval_split or "eval", skipped, n if self.streamed else
                               len(self.eval_loader.dataset), self.args.max_bad_share)
        return {"eval_loss": losses / n, "eval_top1": top1 / n, "eval_top5": top5 / n, "eval_skipped": skipped}

    def evaluate_epoch(self) -> tuple[dict, str]:
        """timm: with an EMA, the EMA's metrics are the epoch's (they rank checkpoints); both are reported."""
        metrics = self.evaluate()
        note = _metrics_note(metrics)
        if self.ema is not None and not self.args.model_ema_force_cpu:
            metrics = self.evaluate(self.ema.module)
            note += f"  EMA: {_metrics_note(metrics)}"
        return metrics, note

    def run_epoch(self) -> None:
        """Train one epoch, evaluate, write its row and checkpoints, print its line."""
        args, epoch = self.args, self.epoch
        train = self.train_epoch()
        metrics, note = {}, ""
        if self.eval_loader is not None and (self.epoch % args.val_interval == 0 or self.epoch == self.num_epochs):
            metrics, note = self.evaluate_epoch()
        metric = metrics.get(f"eval_{self.eval_metric}") if self.eval_loader is not None else train["loss"]
        self.scheduler.step(self.epoch, metric)
        row = {"epoch": epoch, "train_loss": train["loss"], **{k: metrics.get(k) for k in SUMMARY_COLUMNS[2:5]},
               "lr": self.optimizer.param_groups[0]["lr"], **{k: train[k] for k in EPOCH_STATS[1:]},
               "second_order": self.step.second_order(), "train_skipped": self.epoch_skipped,
               "eval_skipped": metrics.get("eval_skipped")}
        self.rows.append(row)
        self.save("epoch", epoch=epoch, metric=metric)
        self.write_summary()
        self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self.num_updates)
        skipped = {"training": self.epoch_skipped, "eval": row["eval_skipped"]}
        if any(skipped.values()):
            note += "  unreadable samples skipped: " + ", ".join(f"{n} {split}" for split, n in skipped.items() if n)
        self.print(f"epoch {epoch}: train_loss {train['loss']:.4f} grad_cosine {train['grad_cosine']:.3f} " + note)

    def fit(self) -> dict:
        args, acc = self.args, self.accelerator
        self.write_args()
        if args.log_with:
            wandb = {k: v for k, v in (("tags", args.wandb_tags), ("id", args.wandb_resume_id)) if v}
            if args.wandb_resume_id:
                wandb["resume"] = "must"
            acc.init_trackers(args.wandb_project or self.out_dir.name, config=tracker_config(args),
                              init_kwargs={"wandb": wandb} if wandb else {})
        self.print(f"model {args.model}: {self.weights_note}; {acc.num_processes} process(es), "
                   f"{acc.device}, mixed precision {acc.mixed_precision}")
        self.print(f"MLTP variant {args.variant!r}, gamma {args.gamma}: S = {self.selection_note}")
        accumulated = f" ({args.grad_accum_steps} pairs accumulated)" if args.grad_accum_steps > 1 else ""
        self.print(f"each step: 2 x {args.batch_size} samples per process{accumulated}, "
                   f"{self.updates_per_epoch} steps per epoch")
        start = time.time()
        with self.preemption:
            while self.epoch < self.num_epochs:
                self.run_epoch()
                if self.epoch < self.num_epochs:
                    self.stop_if_preempted()   # signalled during evaluation: last.pth.tar is this epoch's end
        acc.end_training()
        top1 = [r["eval_top1"] for r in self.rows if r["eval_top1"] is not None]
        result = {"best_top1": max(top1) if top1 else None, "best_metric": self.saver.best_metric,
                  "best_epoch": self.saver.best_epoch, "eval_metric": self.eval_metric, "epochs": self.num_epochs,
                  "optimizer_steps": self.num_updates, "wall_seconds": time.time() - start, "rows": self.rows,
                  "second_order": self.step.second_order(), "output": str(self.out_dir)}
        if self.saver.best_metric is not None:
            self.print(f"*** Best metric: {self.saver.best_metric:.4f} ({self.eval_metric}, epoch "
                       f"{self.saver.best_epoch})")
        return result


def _metrics_note(metrics: dict) -> str:
    return (f"eval_loss {metrics['eval_loss']:.4f} top1 {metrics['eval_top1']:.2f} "
            f"top5 {metrics['eval_top5']:.2f}")


def _mean_stats(stats: list) -> dict:
    """The mean of several pairs' MLTPStats (the pairs of one accumulated step); text fields from the first."""
    rows = [s.as_dict() for s in stats]
    return {k: sum(r[k] for r in rows) / len(rows) if isinstance(v, (int, float)) else v
            for k, v in rows[0].items()}


def _mean(total_count) -> float:
    total, count = total_count
    return total / count if count else math.nan


def train(args: TrainArgs) -> dict:
    """Build, check and run one training job; returns its summary."""
    return Trainer(args).fit()


__all__ = ["TrainArgs", "Trainer", "train", "accumulation_groups", "check_distributed_type", "DEFAULT_DATASET",
           "SUMMARY_COLUMNS"]
