"""A small Accelerate train/evaluate engine for timm models with MLTP; recipes/train.py is its CLI.

Build with timm's factories, distribute with Accelerate, get the gradient from the core:

    for batch in loader:                          # 2B samples per process: task i and task j
        stats = step.pair(batch)                  # this process's MLTP gradient (loss scale, autocast)
        if step.sync():                           # mean over processes; every process skips a non-finite step
            optimizer.step()
"""
from __future__ import annotations

import csv
import difflib
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import DEFAULT_DATASET, apply_transforms, collate_image_batch, create_transforms, load_image_dataset
from .errors import MLTPConfigError
from .mltp import MLTPConfig, second_order_in_use
from .step import MLTPStep
from .selection import select_parameters, summarize_selection

# the MLTP statistics averaged over each epoch (MLTPStats fields)
EPOCH_STATS = ("loss", "loss_i", "loss_j", "grad_cosine", "alpha", "relative_step", "update_ratio")
SUMMARY_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", *EPOCH_STATS[1:]]


@dataclass
class TrainArgs:
    """Every option of recipes/train.py; the names are timm train.py's where timm has them."""

    # model
    model: str = "resnet18"
    pretrained: bool = False
    pretrained_path: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    drop_rate: float = 0.0
    drop_path_rate: float | None = None
    # data
    dataset: str | None = None           # None: the shipped Fashion-MNIST subset
    image_column: str | None = None
    label_column: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    max_train_samples: int | None = None
    scale: tuple[float, float] = (0.8, 1.0)  # random-resized-crop area range (timm's --scale)
    hflip: float = 0.5
    # optimisation
    batch_size: int = 32                  # B, the size of ONE task: each step uses 2B per process
    epochs: int = 2
    opt: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "cosine"
    warmup_epochs: int = 0
    smoothing: float = 0.0
    clip_grad: float | None = None
    # MLTP
    variant: str = "full"
    gamma: float = 0.5
    alpha_rule: str | None = None         # optimizer | lr | fixed | clip | update | relative; None: fixed if --alpha, else
                                          # MLTPConfig's default
    alpha: float | None = None            # rule fixed: the inner step size
    alpha_scale: float = 1.0
    relative_step: float = 1e-3           # rule relative: ||inner step|| / ||w_S||
    second_order: str = "auto"
    bn_update: str = "both"
    # run
    seed: int = 42
    workers: int | None = None            # None: 4 with a GPU; 0 on the CPU, where loader processes would
                                          # compete with the math's threads for the same cores
    log_interval: int = 50
    output: str = "output/train"
    experiment: str | None = None
    resume: str | None = None
    checkpoint_interval: int = 0          # also checkpoint every N optimizer steps (0: at epoch ends only)
    mixed_precision: str | None = None    # no | bf16 | fp16; None: accelerate's config
    cpu: bool = False
    max_bad_steps: int = 5                # stop after this many non-finite losses in a row
    progress: bool = True


# ---- building: everything that can be wrong is found here, before the first step -----------------

def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    raise MLTPConfigError(f"unknown model {name!r}" + (f"; did you mean {', '.join(near)}?" if near else "")
                          + " timm.list_models('*pattern*') lists the names timm knows.")


def load_weights_file(model: torch.nn.Module, path: str) -> str:
    """Load a local weights file; classifier weights whose shape differs (another --num-classes) are
    left freshly initialised. Returns what was done, for the log."""
    if not os.path.isfile(path):
        raise MLTPConfigError(f"--pretrained-path {path!r} is not a file; give a .pth/.pth.tar/.safetensors "
                              f"weights file (a checkpoint this recipe wrote works too)")
    state = timm.models.load_state_dict(path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in skipped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in skipped]:
        raise MLTPConfigError(f"--pretrained-path {path!r} does not fit this model: missing keys "
                              f"{[k for k in missing if k not in skipped][:5]}, unexpected keys {unexpected[:5]}; "
                              f"is it a checkpoint of another architecture?")
    return f"loaded {path}" + (f", re-initialised {', '.join(skipped)} (shape differs)" if skipped else "")


def build_model(args: TrainArgs, num_classes: int) -> tuple[torch.nn.Module, str]:
    check_model_name(args.model)
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop_rate)
    if args.drop_path_rate is not None:
        kwargs["drop_path_rate"] = args.drop_path_rate
    if args.pretrained and not args.pretrained_path:
        try:
            return timm.create_model(args.model, pretrained=True, **kwargs), "pretrained weights from the hub"
        except Exception as e:  # offline, or no weights for this name
            raise MLTPConfigError(f"could not load pretrained weights for {args.model!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); without network access pass a local file "
                                  f"with --pretrained-path") from e
    model = timm.create_model(args.model, **kwargs)
    note = load_weights_file(model, args.pretrained_path) if args.pretrained_path else "random initialisation"
    return model, note


class SeededAugmentation(torch.utils.data.Dataset):
    """Random augmentation of sample n in epoch e drawn from a generator seeded by (seed, e, n).

    The global random state is left as it was, so dropout draws do not depend on data loading:
    resuming mid-epoch reproduces an uninterrupted run exactly, with any number of workers.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample_seed = hash((self.seed, self.epoch, int(index))) & 0x7FFF_FFFF_FFFF_FFFF
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)         # timm's crops draw from `random`
            try:
                return self.dataset[int(index)]
            finally:
                random.setstate(python_state)


def build_loaders(args: TrainArgs, model, data, world_size: int):
    img_size = args.img_size or (32 if args.dataset is None else None)  # the shipped data is 28x28
    train_tf = create_transforms(model, img_size=img_size, is_training=True, scale=args.scale, hflip=args.hflip,
                                 color_jitter=0.0)
    eval_tf = create_transforms(model, img_size=img_size, is_training=False, crop_pct=1.0)
    train = data.train
    if args.max_train_samples:
        train = train.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train))))
    pair = 2 * args.batch_size * world_size
    if len(train) < pair:
        raise MLTPConfigError(f"the training split has {len(train)} samples, fewer than one pair of batches "
                              f"(2 x batch size {args.batch_size} x {world_size} processes = {pair}); lower "
                              f"--batch-size or use more data")
    in_chans = getattr(model, "in_chans", None) or timm.data.resolve_data_config({}, model=model)["input_size"][0]
    train = SeededAugmentation(apply_transforms(train, train_tf, data.image_column, data.label_column,
                                                in_chans=in_chans), args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # re-seeded every epoch: see Trainer.train_epoch
    train_loader = DataLoader(train, batch_size=2 * args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.workers, collate_fn=collate_image_batch, generator=generator,
                              persistent_workers=False)  # workers must see each epoch's SeededAugmentation.epoch
    eval_loader = None
    if data.eval is not None:
        eval_set = apply_transforms(data.eval, eval_tf, data.image_column, data.label_column, in_chans=in_chans)
        eval_loader = DataLoader(eval_set, batch_size=4 * args.batch_size, shuffle=False,
                                 num_workers=args.workers, collate_fn=collate_image_batch)
    return train_loader, eval_loader, generator


# ---- checkpoints: atomic, complete, loadable by timm ----------------------------------------------

def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every random state the run draws from, in types `torch.load(weights_only=True)` accepts (timm loads so)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the loop -------------------------------------------------------------------------------------

def mltp_config(args: TrainArgs) -> MLTPConfig:
    """The recipe's MLTP options as the core's config (which checks them)."""
    rule = args.alpha_rule or ("fixed" if args.alpha is not None else MLTPConfig.alpha_rule)
    return MLTPConfig(variant=args.variant, gamma=args.gamma, second_order=args.second_order,
                      bn_update=args.bn_update, alpha_rule=rule, alpha=args.alpha, alpha_scale=args.alpha_scale,
                      relative_step=args.relative_step)


def check_distributed_type(accelerator: Accelerator) -> None:
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                        DistributedType.MEGATRON_LM):
        raise MLTPConfigError(f"the recipe supports single-process and data-parallel (DDP) training, not "
                              f"{accelerator.distributed_type.value}: the inner step needs every process to hold "
                              f"whole parameters; run `accelerate config` again and choose multi-GPU (DDP)")


class Trainer:
    """One training run: built (and checked) in __init__, run by `fit()`.

    `accelerator`: one built by the caller (another mixed-precision setup, a custom gradient scaler);
    default: from `args.mixed_precision` and `args.cpu`.
    """

    def __init__(self, args: TrainArgs, accelerator: Accelerator | None = None):
        self.args = args
        self.mltp = mltp_config(args)
        if args.batch_size < 1 or args.epochs < 1:
            raise MLTPConfigError(f"--batch-size and --epochs must be >= 1, got {args.batch_size} and {args.epochs}")
        if args.resume and not os.path.isfile(args.resume):
            raise MLTPConfigError(f"--resume {args.resume!r} is not a file; give a checkpoint this recipe wrote "
                                  f"(OUTPUT/EXPERIMENT/last.pth.tar or a step checkpoint)")
        check_model_name(args.model)
        # several CPU processes (torchrun): Accelerate sets up gloo only when told it is on the CPU
        cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = accelerator or Accelerator(mixed_precision=args.mixed_precision,
                                                      cpu=args.cpu or cpu_processes)
        check_distributed_type(self.accelerator)
        set_seed(args.seed)
        acc = self.accelerator

        data = load_image_dataset(args.dataset, image_column=args.image_column, label_column=args.label_column,
                                  train_split=args.train_split, eval_split=args.eval_split)
        num_classes = args.num_classes or data.num_classes
        model, self.weights_note = build_model(args, num_classes)
        self.selection = select_parameters(model, args.variant)  # bad variants fail here, before data work
        self.selection_note = summarize_selection(model, self.selection)
        if args.workers is None:
            args.workers = 4 if acc.device.type == "cuda" else 0
        train_loader, eval_loader, self.shuffle_generator = build_loaders(args, model, data, acc.num_processes)
        self.train_set = train_loader.dataset

        optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            step_on_epochs=False, updates_per_epoch=len(train_loader) // acc.num_processes)
        self.model, self.optimizer, self.train_loader = acc.prepare(model, optimizer, train_loader)
        self.eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
        # the MLTP passes run on the plain module: each process's own gradient, no DDP hooks (SPEC)
        self.module = acc.unwrap_model(self.model)
        self.step = MLTPStep(acc, self.module, self.optimizer, self.mltp, self.loss_fn,
                             max_grad_norm=args.clip_grad)
        self.out_dir = Path(args.output) / (args.experiment or "-".join(
            [time.strftime("%Y%m%d-%H%M%S"), args.model, args.variant.replace(",", "+").replace("*", "x")]))
        self.epoch, self.step_in_epoch, self.num_updates = 0, 0, 0
        self.best_top1, self.best_epoch, self.rows = None, None, []
        self.epoch_sums = {}
        if args.resume:
            self.load_checkpoint(args.resume)

    # -- logging and files
    def print(self, *a):
        self.accelerator.print(*a)

    def checkpoint_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {"arch": self.args.model, "state_dict": self.module.state_dict(),
                "optimizer": self.optimizer.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "num_updates": self.num_updates,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch, "rows": self.rows,
                "epoch_sums": self.epoch_sums, "inner_step": self.step.inner_step.state_dict(),
                "args": asdict(self.args)}

    def save(self, name: str) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_save(self.checkpoint_state(), self.out_dir / name)

    def load_checkpoint(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt.get("arch") != self.args.model:
            raise MLTPConfigError(f"--resume {path!r} is a checkpoint of {ckpt.get('arch')!r}, not {self.args.model!r}")
        self.module.load_state_dict(ckpt["state_dict"])
        self.optimizer.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step.inner_step.load_state_dict(ckpt["inner_step"])
        for key in ("epoch", "step_in_epoch", "num_updates", "best_top1", "best_epoch", "rows", "epoch_sums"):
            setattr(self, key, ckpt[key])
        self.print(f"resumed from {path}: epoch {self.epoch}, step {self.step_in_epoch}")

    def write_summary(self) -> None:
        if self.accelerator.is_main_process:
            with open(self.out_dir / "summary.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows)

    # -- steps
    def loss_fn(self, module, batch):
        images, labels = batch
        return F.cross_entropy(module(images), labels, label_smoothing=self.args.smoothing)

    def train_step(self, batch) -> dict | None:
        """One optimizer step on one 2B batch. None when its loss was not finite (every process skips it);
        `skipped` when an fp16 gradient scaler found inf/nan gradients and backed off."""
        acc = self.accelerator
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.step.pair((batch["pixel_values"], batch["labels"]))
        if not getattr(self, "_reported", False):
            self._reported = True
            self.print(f"second order in use: {stats.second_order}")
        if not self.step.sync():
            self.optimizer.step()   # no gradients, or inf ones that make the fp16 scaler skip it and back off
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.args.clip_grad:
            acc.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.args.clip_grad)
        self.optimizer.step()                          # through the fp16 scaler when there is one
        if acc.optimizer_step_was_skipped:
            return {**stats.as_dict(), "skipped": True}
        self.num_updates += 1
        self.scheduler.step_update(num_updates=self.num_updates)
        return {**stats.as_dict(), "skipped": False}

    def train_epoch(self) -> dict:
        args, acc = self.args, self.accelerator
        self.model.train()
        # the epoch's order and each sample's augmentation depend on (seed, epoch, index) alone, so a
        # resumed run sees the same batches, whatever the loader prefetched or the workers drew before
        self.shuffle_generator.manual_seed(args.seed + self.epoch)
        self.train_loader.set_epoch(self.epoch)
        self.train_set.epoch = self.epoch
        loader = acc.skip_first_batches(self.train_loader, self.step_in_epoch) if self.step_in_epoch else self.train_loader
        if not self.step_in_epoch:   # the epoch's running means; a checkpoint carries them over a resume
            self.epoch_sums = {k: [0.0, 0] for k in EPOCH_STATS}
        sums, bad_in_row = self.epoch_sums, 0
        bar = tqdm(loader, total=len(self.train_loader), initial=self.step_in_epoch, leave=False,
                   desc=f"epoch {self.epoch}", disable=not (args.progress and acc.is_local_main_process))
        for batch in bar:
            stats = self.train_step(batch)
            self.step_in_epoch += 1
            if stats is None:
                bad_in_row += 1
                self.print(f"step {self.num_updates}: non-finite loss, step skipped ({bad_in_row} in a row)")
                if bad_in_row >= args.max_bad_steps:
                    raise MLTPConfigError(f"{bad_in_row} non-finite losses in a row at epoch {self.epoch}; stopped. "
                                          f"Lower --lr or --alpha-scale, or use --clip-grad; the last checkpoint "
                                          f"in {self.out_dir} is intact (--resume it)")
                continue
            bad_in_row = 0
            if stats.get("skipped"):
                self.print(f"step {self.num_updates}: fp16 gradient overflow, step skipped; loss scale now "
                           f"{self.step.loss_scale():g}")
            for k in EPOCH_STATS:
                if math.isfinite(stats.get(k, math.nan)):   # update_ratio is nan before the first update
                    sums[k][0] += stats[k]
                    sums[k][1] += 1
            if self.step_in_epoch % args.log_interval == 0:
                bar.set_postfix(loss=f"{_mean(sums['loss']):.3f}", cos=f"{_mean(sums['grad_cosine']):.3f}",
                                rel_step=f"{_mean(sums['relative_step']):.1e}")
            if args.checkpoint_interval and self.num_updates % args.checkpoint_interval == 0:
                self.save("last.pth.tar")
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return {k: _mean(v) for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        acc = self.accelerator
        self.model.eval()
        losses, top1, top5, n = 0.0, 0.0, 0.0, 0
        for batch in self.eval_loader:
            with acc.autocast():
                logits = self.module(batch["pixel_values"])
            logits, labels = acc.gather_for_metrics((logits.float(), batch["labels"]))
            k = min(5, logits.shape[1])
            a1, a5 = accuracy(logits, labels, topk=(1, k))
            losses += F.cross_entropy(logits, labels, reduction="sum").item()
            top1, top5, n = top1 + a1.item() * len(labels), top5 + a5.item() * len(labels), n + len(labels)
        return {"eval_loss": losses / n, "eval_top1": top1 / n, "eval_top5": top5 / n}

    def fit(self) -> dict:
        args, acc = self.args, self.accelerator
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "args.yaml", "w") as f:
                yaml.safe_dump(asdict(self.args), f, sort_keys=False)
        self.print(f"model {args.model}: {self.weights_note}; {acc.num_processes} process(es), "
                   f"{acc.device}, mixed precision {acc.mixed_precision}")
        self.print(f"MLTP variant {args.variant!r}, gamma {args.gamma}: S = {self.selection_note}")
        self.print(f"each step: 2 x {args.batch_size} samples per process, {len(self.train_loader)} steps per epoch")
        start = time.time()
        while self.epoch < self.num_epochs:
            epoch = self.epoch
            train = self.train_epoch()
            metrics = self.evaluate() if self.eval_loader is not None else {}
            self.scheduler.step(self.epoch)
            row = {"epoch": epoch, "train_loss": train["loss"], **{k: metrics.get(k) for k in SUMMARY_COLUMNS[2:5]},
                   "lr": self.optimizer.param_groups[0]["lr"],
                   **{k: train[k] for k in EPOCH_STATS[1:]}}
            self.rows.append(row)
            improved = metrics and (self.best_top1 is None or metrics["eval_top1"] > self.best_top1)
            if improved:
                self.best_top1, self.best_epoch = metrics["eval_top1"], epoch
            self.save("last.pth.tar")
            if improved:
                self.save("model_best.pth.tar")
            self.write_summary()
            self.print(f"epoch {epoch}: train_loss {train['loss']:.4f} grad_cosine {train['grad_cosine']:.3f} "
                       + (f"eval_loss {metrics['eval_loss']:.4f} top1 {metrics['eval_top1']:.2f} "
                          f"top5 {metrics['eval_top5']:.2f}" if metrics else ""))
        result = {"best_top1": self.best_top1, "best_epoch": self.best_epoch, "epochs": self.num_epochs,
                  "optimizer_steps": self.num_updates, "wall_seconds": time.time() - start, "rows": self.rows,
                  "second_order": second_order_in_use(self.module, self.mltp), "output": str(self.out_dir)}
        if self.best_top1 is not None:
            self.print(f"*** Best metric: {self.best_top1:.2f} (epoch {self.best_epoch})")
        return result


def _mean(total_count) -> float:
    total, count = total_count
    return total / count if count else math.nan


def train(args: TrainArgs) -> dict:
    """Build, check and run one training job; returns its summary."""
    return Trainer(args).fit()


__all__ = ["TrainArgs", "Trainer", "train", "DEFAULT_DATASET", "SUMMARY_COLUMNS"]
