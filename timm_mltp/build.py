"""The pieces of one training run, built from TrainArgs with timm's own factories.

`build_run(args, accelerator)` is where the options become the run's pieces (`Run`), in this order; the engine
then prepares them with Accelerate and loops. One function per piece; everything that can be wrong with the
options is found here, before the first step:

    model      timm.create_model (pretrained weights, a local weights file through timm's pretrained loading)
    data       timm.data.resolve_data_config + create_transform, on a `datasets` dataset (map-style, or streamed:
               each process its own part behind a shuffle buffer, data.StreamedSplit)
    optimizer  timm.optim.create_optimizer_v2 (layer decay, eps, betas, kwargs)
    schedule   timm.scheduler.create_scheduler_v2
    mixup      timm.data.Mixup, applied to each task separately (data.mix_within_tasks)
    loss       timm.loss (soft targets, label smoothing, BCE)
    EMA        timm.utils.ModelEmaV3
"""
from __future__ import annotations

import difflib
import inspect
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.layers import set_fast_norm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from .checkpoints import load_weights, refusing_pickle
from .data import (ImageDataset, SeededAugmentation, SkipUnreadable, StreamedSplit, apply_transforms,
                   collate_image_batch, create_transforms, image_transform, is_streamed, load_image_dataset)
from .errors import MLTPConfigError
from .mltp import MLTPConfig
from .preemption import ignore_in_loader_worker
from .selection import select_parameters, summarize_selection

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .train_args import TrainArgs

SHIPPED_IMG_SIZE = 32    # the shipped Fashion-MNIST images are 28x28
EVAL_METRICS = ("top1", "top5", "loss")
CLIP_MODES = ("norm", "value", "agc")
MIXUP_MODES = ("batch", "pair", "elem")


def check_args(args: TrainArgs) -> None:
    """What no factory checks: counts, files, and options that only make sense together."""
    for name in ("batch_size", "epochs", "grad_accum_steps", "log_interval", "checkpoint_hist", "val_interval",
                 "max_bad_samples"):
        if getattr(args, name) < 1:
            raise MLTPConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_num_samples is not None and args.train_num_samples < 1:
        raise MLTPConfigError(f"--train-num-samples must be >= 1, got {args.train_num_samples}")
    if args.shuffle_buffer < 0:
        raise MLTPConfigError(f"--shuffle-buffer must be >= 0 (0: no shuffling), got {args.shuffle_buffer}")
    for name in ("resume", "pretrained_path", "initial_checkpoint"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise MLTPConfigError(f"--{name.replace('_', '-')} {path!r} is not a file; give a .pth/.pth.tar/"
                                  f".safetensors file (a checkpoint this recipe wrote works too)")
    for name, value, allowed in (("eval-metric", args.eval_metric, EVAL_METRICS),
                                 ("clip-mode", args.clip_mode, CLIP_MODES),
                                 ("mixup-mode", args.mixup_mode, MIXUP_MODES)):
        if value not in allowed:
            raise MLTPConfigError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
    if mixup_active(args) and args.batch_size % 2:
        raise MLTPConfigError(f"--mixup/--cutmix pair sample k with sample B-1-k of each task, so the task size "
                              f"must be even; got --batch-size {args.batch_size}")


@dataclass
class Loaders:
    train: DataLoader              # batches of 2B samples: task i, then task j
    eval: DataLoader | None
    batches_per_process: int       # training loader batches each process takes per epoch
    train_size: int                # training samples per epoch, all processes together
    shuffle_generator: torch.Generator | None   # map-style: the engine re-seeds it every epoch; None: streamed


@dataclass
class Run:
    """The pieces of one training run, as `build_run` returns them, before Accelerate prepares them."""
    mltp: MLTPConfig
    model: nn.Module
    weights_note: str              # what was loaded into the model
    selection: object              # the parameters S the inner step moves (selection.select_parameters)
    selection_note: str
    num_classes: int
    loaders: Loaders
    streamed: bool                 # data.StreamedSplit: each process reads its own part; Accelerate does not shard
    optimizer: torch.optim.Optimizer
    scheduler: object              # timm's scheduler, stepped per update (or epoch)
    num_epochs: int                # including cooldown
    updates_per_epoch: int
    mixup: Mixup | None
    train_loss: nn.Module


def build_run(args: TrainArgs, accelerator: Accelerator) -> Run:
    """The options, checked, as the run's pieces: the one place the engine hands its options to."""
    check_args(args)
    mltp = mltp_config(args)
    check_model_name(args.model)
    if args.workers is None:
        args.workers = 4 if accelerator.device.type == "cuda" else 0
    data = load_image_dataset(args.dataset or args.data_dir, image_column=args.image_column,
                              label_column=args.label_column, train_split=args.train_split,
                              eval_split=args.eval_split)
    num_classes = args.num_classes or data.num_classes
    if num_classes is None:
        raise MLTPConfigError(f"--dataset {args.dataset or args.data_dir}: the stream's labels are integer ids and a "
                              f"stream cannot be scanned for the largest; give --num-classes")
    model, weights_note = build_model(args, num_classes)
    selection = select_parameters(model, args.variant)   # bad variants fail here, before data work
    build = build_stream_loaders if data.streamed else build_loaders
    loaders = build(args, model, data, accelerator.num_processes, accelerator.process_index)
    optimizer = build_optimizer(args, model)
    updates_per_epoch = math.ceil(loaders.batches_per_process / args.grad_accum_steps)
    scheduler, num_epochs = build_scheduler(args, optimizer, updates_per_epoch)
    return Run(mltp=mltp, model=model, weights_note=weights_note, selection=selection,
               selection_note=summarize_selection(model, selection), num_classes=num_classes, loaders=loaders,
               streamed=data.streamed, optimizer=optimizer, scheduler=scheduler, num_epochs=num_epochs,
               updates_per_epoch=updates_per_epoch, mixup=build_mixup(args, num_classes),
               train_loss=build_train_loss(args))


def uses_shipped_data(args: TrainArgs) -> bool:
    return args.dataset is None and args.data_dir is None


def image_size(args: TrainArgs) -> int | tuple[int, int] | None:
    """The input size to build the model and transforms for; None: the model's."""
    if args.img_size:
        return args.img_size
    if args.input_size:
        return tuple(args.input_size[1:])
    return SHIPPED_IMG_SIZE if uses_shipped_data(args) else None


def input_channels(args: TrainArgs) -> int | None:
    return args.in_chans or (args.input_size[0] if args.input_size else None)


# ---- MLTP ------------------------------------------------------------------------------------------

def mltp_config(args: TrainArgs) -> MLTPConfig:
    """The recipe's MLTP options as the core's config (which checks them).

    A compiled model has no double backward (aot_autograd's backward is not differentiable), so `auto`
    means `fd` there, and `exact` is refused before the first step. Gradient checkpointing is refused with
    MLTP: it recomputes forward passes during backward, after MLTP's pass at w' has put w back, so the
    gradient comes out wrong (measured: 10-12 % on test_resnet for fo and exact, or a CheckpointError)."""
    second_order = args.second_order
    if args.grad_checkpointing and args.variant != "none":
        raise MLTPConfigError(f"--grad-checkpointing cannot be combined with MLTP (--variant {args.variant}): the "
                              f"recomputed forward passes would see w instead of w' and give a wrong gradient; "
                              f"drop --grad-checkpointing (lower -b or use --grad-accum-steps to save memory)")
    if args.torchcompile and second_order == "exact":
        raise MLTPConfigError("--second-order exact needs double backward, which a torch.compile'd model does not "
                              "have; use --second-order fd (or auto, which picks fd for compiled models)")
    if second_order == "auto" and args.torchcompile:
        second_order = "fd"
    rule = args.alpha_rule or ("fixed" if args.alpha is not None else MLTPConfig.alpha_rule)
    return MLTPConfig(variant=args.variant, gamma=args.gamma, second_order=second_order, bn_update=args.bn_update,
                      alpha_rule=rule, alpha=args.alpha, alpha_scale=args.alpha_scale,
                      relative_step=args.relative_step, curvature_fraction=args.curvature_fraction,
                      auto_timing=args.auto_timing and second_order == "auto")


# ---- model -----------------------------------------------------------------------------------------

def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    raise MLTPConfigError(f"unknown model {name!r}" + (f"; did you mean {', '.join(near)}?" if near else "")
                          + " timm.list_models('*pattern*') lists the names timm knows.")


def _classifier_names(model_name: str) -> tuple[str, ...]:
    names = timm.models.get_pretrained_cfg_value(model_name, "classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def pretrained_file_overlay(model_name: str, path: str, trust: bool = False) -> tuple[dict, dict]:
    """timm's `pretrained_cfg_overlay` for a local weights file, and the file's weights.

    The overlay hands timm's pretrained loading the weights read here (once, tensors only unless `trust`) and
    names the file's own class count, so that timm re-initialises the classifier exactly when the model's
    differs (timm's train.py passes num_classes=-1 and always re-initialises it); the model's checkpoint filter
    resamples what depends on the input size (ViT position embeddings)."""
    state = load_weights(path, "--pretrained-path", trust)   # EMA weights where the file has them, as timm loads
    rows = next((state[n + ".weight"].shape[0] for n in _classifier_names(model_name) if n + ".weight" in state), -1)
    return dict(state_dict=dict(state), num_classes=rows), state   # (timm edits the dict it is given)


def _describe_adaptation(model: nn.Module, model_name: str, path: str, file_state: dict, file_classes: int) -> str:
    """What timm's loading changed, for the log: a new classifier, tensors resampled to the model's size."""
    own = model.state_dict()
    classifiers = [n + suffix for n in _classifier_names(model_name) for suffix in (".weight", ".bias")]
    notes = [f"loaded {path}"]
    if file_classes != model.num_classes:
        new_head = [k for k in classifiers if k in own]
        notes.append(f"re-initialised {', '.join(new_head)} ({file_classes} -> {model.num_classes} classes)")
    resized = [f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in file_state.items()
               if k in own and k not in classifiers and v.shape != own[k].shape]
    if resized:
        notes.append(f"resized by timm's checkpoint filter: {', '.join(resized)}")
    return "; ".join(notes)


def build_model(args: TrainArgs, num_classes: int) -> tuple[nn.Module, str]:
    """timm.create_model with every model option; returns the model and what was loaded into it."""
    check_model_name(args.model)
    if args.fast_norm:
        set_fast_norm()   # read by timm's norm layers when they are built
    kwargs = dict(num_classes=num_classes, in_chans=input_channels(args), drop_rate=args.drop_rate,
                  drop_path_rate=args.drop_path_rate, drop_block_rate=args.drop_block_rate, global_pool=args.gp,
                  bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, **args.model_kwargs)   # None: the model's
    size = image_size(args)
    # timm's convention: a model whose pretrained config fixes its input size takes `img_size`
    if size is not None and timm.models.get_pretrained_cfg_value(args.model, "fixed_input_size"):
        kwargs["img_size"] = size
    file_state = None
    if args.pretrained_path:
        kwargs["pretrained_cfg_overlay"], file_state = pretrained_file_overlay(args.model, args.pretrained_path,
                                                                               args.trust_checkpoint)
    pretrained = args.pretrained or bool(args.pretrained_path)
    try:
        model = timm.create_model(args.model, pretrained=pretrained, **kwargs)
        model.pretrained_cfg.pop("state_dict", None)   # the file's weights, not kept beside the model's
        if args.initial_checkpoint:   # what create_model(checkpoint_path=) does, tensors only unless trusted
            with refusing_pickle(args.initial_checkpoint, "--initial-checkpoint"):
                timm.models.load_checkpoint(model, args.initial_checkpoint, weights_only=not args.trust_checkpoint)
    except TypeError as e:   # a keyword this architecture does not take
        raise MLTPConfigError(f"model {args.model!r} cannot be built with these options ({_first_line(e)}); "
                              f"drop the option (or --model-kwargs key) it names") from e
    except RuntimeError as e:
        source = args.pretrained_path or args.initial_checkpoint
        if source is None:   # --pretrained: offline, or no weights for this name
            raise MLTPConfigError(f"could not load pretrained weights for {args.model!r} ({_first_line(e)}); "
                                  f"without network access pass a local file with --pretrained-path") from e
        raise MLTPConfigError(f"weights file {source!r} does not fit {args.model!r} ({_first_line(e)}); is it "
                              f"a checkpoint of another architecture?") from e
    if args.pretrained_path:
        note = _describe_adaptation(model, args.model, args.pretrained_path, file_state,
                                    kwargs["pretrained_cfg_overlay"]["num_classes"])
    elif args.pretrained:
        note = "pretrained weights from the hub"
    else:
        note = "random initialisation"
    if args.initial_checkpoint:
        note += f"; then {args.initial_checkpoint}"
    _adapt_model(args, model)
    return model, note


def _adapt_model(args: TrainArgs, model: nn.Module) -> None:
    """timm train.py's changes to a built model: head initialisation, gradient checkpointing, memory layout."""
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)


def compile_model(args: TrainArgs, model: nn.Module) -> None:
    """torch.compile in place (`nn.Module.compile`): parameter names stay as they are, so variant patterns,
    checkpoints and the MLTP passes see the same model. Call after the EMA copy is made."""
    if args.torchcompile:
        model.compile(backend=args.torchcompile, mode=args.torchcompile_mode)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


# ---- data ------------------------------------------------------------------------------------------

def build_transforms(args: TrainArgs, model: nn.Module):
    """timm's train and eval transforms for `model`, with timm train.py's options."""
    size, in_chans = image_size(args), input_channels(args)
    common = dict(mean=args.mean, std=args.std, in_chans=in_chans)
    train_tf = create_transforms(
        model, img_size=size, is_training=True, interpolation=args.train_interpolation or args.interpolation,
        no_aug=args.no_aug, train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob, gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, **common)
    # the shipped 28x28 images fill the frame: a centre crop would cut the garment
    crop_pct = args.crop_pct or (1.0 if uses_shipped_data(args) else None)
    eval_tf = create_transforms(model, img_size=size, is_training=False, crop_pct=crop_pct,
                                interpolation=args.interpolation, **common)
    return train_tf, eval_tf


def _loader_transforms(args: TrainArgs, model: nn.Module):
    """build_transforms, with timm's refusals as one line; and the model's input channels."""
    try:
        train_tf, eval_tf = build_transforms(args, model)
    except (ValueError, AssertionError, KeyError) as e:
        raise MLTPConfigError(f"timm's create_transform refused the augmentation options ({_first_line(e)}); "
                              f"check --aa, --remode, --train-crop-mode and the interpolation names") from e
    in_chans = getattr(model, "in_chans", None) or timm.data.resolve_data_config({}, model=model)["input_size"][0]
    return train_tf, eval_tf, in_chans


def _too_few(samples: int, args: TrainArgs, world_size: int, what: str) -> MLTPConfigError:
    return MLTPConfigError(f"{what} has {samples} samples, fewer than one pair of batches (2 x batch size "
                           f"{args.batch_size} x {world_size} processes = {2 * args.batch_size * world_size}); "
                           f"lower --batch-size or use more data")


def _one_shard_at_a_time(stream) -> dict:
    """IterableDataset.shuffle's keyword for it, where datasets has one (>= 5)."""
    keywords = inspect.signature(stream.shuffle).parameters
    return {"max_buffer_input_shards": 1} if "max_buffer_input_shards" in keywords else {}


def build_loaders(args: TrainArgs, model: nn.Module, data: ImageDataset, world_size: int, rank: int = 0) -> Loaders:
    """Map-style data: the training loader of the whole split (Accelerate gives each process its batches) and the
    eval loader (or None)."""
    if args.train_num_samples:
        raise MLTPConfigError(f"--train-num-samples {args.train_num_samples} sizes streamed datasets (hfids/, wds/); "
                              f"this map-style split knows its size: use --max-train-samples to train on fewer")
    train_tf, eval_tf, in_chans = _loader_transforms(args, model)
    train = data.train
    if args.max_train_samples:
        train = train.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train))))
    if len(train) < 2 * args.batch_size * world_size:
        raise _too_few(len(train), args, world_size, "the training split")
    train_size = len(train)
    train = apply_transforms(train, train_tf, data.image_column, data.label_column, in_chans=in_chans)
    train = SeededAugmentation(SkipUnreadable(train, args.train_split or "train", args.max_bad_samples), args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=2 * args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.workers, collate_fn=collate_image_batch, generator=generator,
                              pin_memory=args.pin_mem, worker_init_fn=ignore_in_loader_worker,
                              persistent_workers=False)  # workers must see each epoch's SeededAugmentation.epoch
    eval_loader = None
    if data.eval is not None:
        eval_set = apply_transforms(data.eval, eval_tf, data.image_column, data.label_column, in_chans=in_chans)
        eval_set = SkipUnreadable(eval_set, args.eval_split or "eval", args.max_bad_samples)
        eval_loader = DataLoader(eval_set, batch_size=args.validation_batch_size or 4 * args.batch_size,
                                 shuffle=False, num_workers=args.workers, collate_fn=collate_image_batch,
                                 pin_memory=args.pin_mem, worker_init_fn=ignore_in_loader_worker)
    return Loaders(train_loader, eval_loader, len(train_loader) // world_size, train_size, generator)


def build_stream_loaders(args: TrainArgs, model: nn.Module, data: ImageDataset, world_size: int,
                         rank: int = 0) -> Loaders:
    """Streamed data (hfids/, wds/): this process's own part of each split (`split_dataset_by_node`), the training
    part behind a shuffle buffer, as a StreamedSplit. An epoch is --train-num-samples samples, all processes
    together (else the split size the dataset states), in whole steps of 2B per process."""
    from datasets.distributed import split_dataset_by_node

    source = args.dataset or args.data_dir
    if args.max_train_samples:
        raise MLTPConfigError(f"--max-train-samples limits a map-style split; {source} is streamed: give "
                              f"--train-num-samples, the samples in one epoch")
    split_info = (data.train.info.splits or {}).get(args.train_split or "train")
    train_size = args.train_num_samples or getattr(split_info, "num_examples", None)
    if not train_size:
        raise MLTPConfigError(f"--dataset {source}: a stream does not say how many samples it holds; give "
                              f"--train-num-samples N, the samples in one epoch (all processes together)")
    batches = train_size // (2 * args.batch_size * world_size)
    if batches < 1:
        raise _too_few(train_size, args, world_size, "--train-num-samples")
    train_tf, eval_tf, in_chans = _loader_transforms(args, model)
    stream = data.train
    if args.shuffle_buffer:   # the shards' order and a buffer of samples, seeded by (seed, epoch): see set_epoch
        # one shard at a time into the buffer: datasets >= 5 can fill it from several shards on threads, but then
        # reports fewer shards to split by node, and on parquet sleeps 5 s at the end of every pass (arrow #45214)
        stream = stream.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer, **_one_shard_at_a_time(stream))
    # whole shards per process where they divide evenly, else every world_size-th sample: disjoint parts either way
    train = StreamedSplit(split_dataset_by_node(stream, rank=rank, world_size=world_size),
                          image_transform(train_tf, data.image_column, data.label_column, in_chans,
                                          data.train.column_names).one,
                          args.train_split or "train", 2 * args.batch_size, batches, seed=args.seed, rank=rank,
                          max_in_row=args.max_bad_samples)
    # StreamedSplit draws nothing at random itself; a generator keeps the loader off the global random state
    common = dict(num_workers=args.workers, collate_fn=collate_image_batch, pin_memory=args.pin_mem,
                  worker_init_fn=ignore_in_loader_worker, generator=torch.Generator().manual_seed(args.seed))
    train_loader = DataLoader(train, batch_size=2 * args.batch_size, **common)
    eval_loader = None
    if data.eval is not None:
        eval_batch = args.validation_batch_size or 4 * args.batch_size
        eval_set = StreamedSplit(split_dataset_by_node(data.eval, rank=rank, world_size=world_size),
                                 image_transform(eval_tf, data.image_column, data.label_column, in_chans,
                                                 data.eval.column_names).one,
                                 args.eval_split or "eval", eval_batch, None, seed=args.seed, rank=rank,
                                 max_in_row=args.max_bad_samples)
        eval_loader = DataLoader(eval_set, batch_size=eval_batch, **common)
    return Loaders(train_loader, eval_loader, batches, batches * 2 * args.batch_size * world_size, None)


def mixup_active(args: TrainArgs) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup(args: TrainArgs, num_classes: int) -> Mixup | None:
    """timm's Mixup with timm train.py's options; the engine applies it to each task on its own."""
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def build_train_loss(args: TrainArgs) -> nn.Module:
    """timm train.py's training loss; MLTP applies it to each task (L_i and L_j). With mixup the targets are
    soft and already smoothed; --bce-loss is used whenever given (timm drops it without smoothing or mixup)."""
    if args.bce_loss:
        smoothing = {} if mixup_active(args) else {"smoothing": args.smoothing}
        return BinaryCrossEntropy(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum,
                                  pos_weight=args.bce_pos_weight, **smoothing)
    if mixup_active(args):
        return SoftTargetCrossEntropy()
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


# ---- optimisation ----------------------------------------------------------------------------------

def build_optimizer(args: TrainArgs, model: nn.Module) -> torch.optim.Optimizer:
    """create_optimizer_v2 as timm train.py calls it. With --layer-decay each layer is its own parameter
    group with its own learning rate, which the inner step follows (alpha per group, inner_step.py)."""
    try:
        return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise MLTPConfigError(f"timm's create_optimizer_v2 refused --opt {args.opt!r} with these settings "
                              f"({_first_line(e)}); timm.optim.list_optimizers() lists the names") from e


def build_scheduler(args: TrainArgs, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """create_scheduler_v2 as timm train.py calls it; returns (scheduler, number of epochs incl. cooldown)."""
    try:
        return create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == "loss"),
                                   updates_per_epoch=updates_per_epoch)
    except (ValueError, TypeError, AssertionError) as e:
        hint = "; plateau steps once per epoch: add --no-sched-on-updates" if args.sched == "plateau" else ""
        raise MLTPConfigError(f"timm's create_scheduler_v2 refused --sched {args.sched!r} ({_first_line(e)})"
                              f"{hint}") from e


def build_ema(args: TrainArgs, model: nn.Module) -> ModelEmaV3 | None:
    """timm's ModelEmaV3 of the outer weights; build it on the model on its device, before compiling."""
    if not args.model_ema:
        return None
    return ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                      device=torch.device("cpu") if args.model_ema_force_cpu else None)


__all__ = ["build_run", "Run", "Loaders", "check_args", "mltp_config", "check_model_name", "build_model",
           "compile_model", "build_transforms", "build_loaders", "build_stream_loaders", "build_mixup",
           "build_train_loss", "build_optimizer", "build_scheduler", "build_ema", "image_size", "uses_shipped_data",
           "mixup_active", "EVAL_METRICS"]
