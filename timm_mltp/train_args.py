"""Every option of the recipe (recipes/train.py, timm_mltp.engine), as one dataclass.

Names and meanings are timm train.py's wherever timm has the option; the defaults differ where noted
(a short run on the shipped 28x28 Fashion-MNIST subset, not 300 ImageNet epochs).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainArgs:
    """One training run. `-b/--batch-size` is the size of ONE task: each optimizer step takes 2B samples per
    process (times --grad-accum-steps)."""

    # ---- model
    model: str = "resnet18"
    pretrained: bool = False
    pretrained_path: str | None = None    # a local weights file loaded as timm loads pretrained weights
    initial_checkpoint: str | None = None  # loaded strictly after initialisation (timm's checkpoint_path=)
    num_classes: int | None = None        # None: from the dataset
    gp: str | None = None                 # global pool type
    img_size: int | None = None           # None: the model's (32 on the shipped data); built into models that take it
    in_chans: int | None = None
    input_size: tuple[int, int, int] | None = None   # C H W
    drop_rate: float = 0.0                # --drop
    drop_path_rate: float | None = None   # --drop-path
    drop_block_rate: float | None = None  # --drop-block
    bn_momentum: float | None = None
    bn_eps: float | None = None
    model_kwargs: dict = field(default_factory=dict)
    head_init_scale: float | None = None
    head_init_bias: float | None = None
    grad_checkpointing: bool = False
    channels_last: bool = False
    fast_norm: bool = False
    torchcompile: str | None = None       # a torch.compile backend, e.g. inductor
    torchcompile_mode: str | None = None
    # ---- data
    dataset: str | None = None            # None: the shipped Fashion-MNIST subset; hub id (or hfds/ID), local path
    data_dir: str | None = None           # timm's dataset root: a local folder, used when --dataset is not given
    image_column: str | None = None       # timm: --input-key
    label_column: str | None = None       # timm: --target-key
    train_split: str | None = None
    eval_split: str | None = None         # timm: --val-split
    max_train_samples: int | None = None
    train_num_samples: int | None = None  # streamed data (hfids/, wds/): samples in one epoch, all processes together
    shuffle_buffer: int = 4096            # streamed training data: samples in the shuffle buffer (timm's hfids
                                          # default, its HFIDS_SHUFFLE_SIZE); 0: the stream's order
    # ---- preprocessing and augmentation (timm's create_transform)
    crop_pct: float | None = None         # eval centre crop; None: the model's (1.0 on the shipped data)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None      # eval resize interpolation; None: the model's
    train_interpolation: str | None = None  # None: the model's (timm's default is 'random')
    no_aug: bool = False
    train_crop_mode: str | None = None
    scale: tuple[float, float] = (0.8, 1.0)  # random-resized-crop area range (timm: 0.08 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.0             # timm: 0.4
    color_jitter_prob: float | None = None
    grayscale_prob: float | None = None
    gaussian_blur_prob: float | None = None
    aa: str | None = None                 # auto_augment policy, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0                   # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0                    # mixup and cutmix mix within each task (SPEC: never across i and j)
    cutmix: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    smoothing: float = 0.0                # timm: 0.1
    bce_loss: bool = False
    bce_sum: bool = False
    bce_target_thresh: float | None = None
    bce_pos_weight: float | None = None
    # ---- optimisation
    batch_size: int = 32                  # B, the size of ONE task: each step uses 2B per process
    validation_batch_size: int | None = None  # None: 4 x batch size
    grad_accum_steps: int = 1             # one optimizer step = the mean of this many pair gradients
    epochs: int = 2
    opt: str = "sgd"
    opt_eps: float | None = None
    opt_betas: tuple[float, ...] | None = None
    opt_kwargs: dict = field(default_factory=dict)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4            # timm: 2e-5
    layer_decay: float | None = None      # per-layer lr scale; the inner step follows each group's lr
    layer_decay_min_scale: float | None = None
    layer_decay_no_opt_scale: float | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"               # norm | value | agc
    # ---- learning-rate schedule (timm's create_scheduler_v2)
    sched: str = "cosine"
    sched_on_updates: bool = True         # timm: False (per epoch); per update suits short runs
    warmup_epochs: int = 0                # timm: 5
    warmup_lr: float = 1e-5
    warmup_prefix: bool = False
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    decay_epochs: float = 90
    decay_milestones: tuple[int, ...] = (90, 180, 270)
    decay_rate: float = 0.1
    patience_epochs: int = 10
    lr_noise: tuple[float, ...] | None = None
    lr_noise_pct: float = 0.67
    lr_noise_std: float = 1.0
    lr_cycle_mul: float = 1.0
    lr_cycle_decay: float = 0.5
    lr_cycle_limit: int = 1
    lr_k_decay: float = 1.0
    # ---- weight EMA (timm's ModelEmaV3): follows the outer weights after each optimizer step
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    model_ema_force_cpu: bool = False     # kept on the CPU and not evaluated, as in timm
    # ---- MLTP
    variant: str = "full"
    gamma: float = 0.5
    alpha_rule: str | None = None         # timm_mltp.ALPHA_RULES (README); None: fixed if
                                          # --alpha, else MLTPConfig's default
    alpha: float | None = None            # rule fixed: the inner step size
    alpha_scale: float = 1.0
    relative_step: float = 1e-3           # rule relative: ||inner step|| / ||w_S||
    second_order: str = "auto"
    auto_timing: bool = False             # auto: also time exact against fd where fd is accurate (not reproducible)
    curvature_fraction: float = 1.0       # exact and fd: H_i v from this random fraction of task i (1: all of it)
    bn_update: str = "both"
    # ---- run
    seed: int = 42
    deterministic: bool = False           # deterministic kernels (torch.use_deterministic_algorithms), as HF's
                                          # full_determinism and Lightning's deterministic=True
    workers: int | None = None            # None: 4 with a GPU; 0 on the CPU, where loader processes would
                                          # compete with the math's threads for the same cores
    pin_mem: bool = False
    log_interval: int = 50                # optimizer steps between two log lines
    log_with: tuple[str, ...] | None = None  # Accelerate trackers: tensorboard, wandb, ... (optional packages)
    wandb_project: str | None = None
    wandb_tags: tuple[str, ...] | None = None
    wandb_resume_id: str | None = None
    save_images: bool = False             # the pair of each log step as a PNG grid
    output: str = "output/train"
    experiment: str | None = None
    resume: str | None = None
    no_resume_opt: bool = False
    eval_metric: str = "top1"             # top1 | top5 | loss: ranks checkpoints, picks model_best
    val_interval: int = 1                 # epochs between evaluations (the last epoch is always evaluated)
    checkpoint_hist: int = 10             # keep the N best epoch checkpoints checkpoint-EPOCH.pth.tar
    checkpoint_interval: int = 0          # also write last.pth.tar every N optimizer steps (0: epoch ends only)
    recovery_interval: int = 0            # also write recovery-EPOCH-STEP.pth.tar every N optimizer steps
    mixed_precision: str | None = None    # no | bf16 | fp16; None: accelerate's config (timm: --amp --amp-dtype)
    cpu: bool = False
    no_ddp_bb: bool = False               # do not broadcast BatchNorm buffers from process 0 after each step
    max_bad_steps: int = 5                # stop after this many non-finite losses in a row
    max_bad_samples: int = 10             # stop after this many unreadable samples in a row (timm's ImageDataset: 10)
    max_bad_share: float = 0.01           # stop when more than this share of a split was unreadable in one epoch
    trust_checkpoint: bool = False        # load --resume/--initial-checkpoint/--pretrained-path files that need
                                          # pickle (which can run code from the file)
    progress: bool = True                 # the tqdm bar (shown on a terminal only)


__all__ = ["TrainArgs"]
