"""The study's settings: what every run of a training regime shares, and the key of one run."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from timm_mltp.mltp import MLTPConfig


METHODS = ("none", "fo", "fc", "conv", "full", "sam")
BASELINES = ("none", "sam")                    # no inner step: their alpha_rule is "-"
PATHS = ("engine", "hf-trainer")
MODELS = ("test_resnet", "test_convnext")      # a BatchNorm ResNet and a LayerNorm ConvNeXt, random init
SEEDS = (0, 1, 2)
DEFAULT_RULE = MLTPConfig.alpha_rule           # what a user gets without choosing
SENSITIVITY_METHOD = "full"
GAMMAS = (0.25, 0.5, 0.75)
ALPHA_SCALES = (0.25, 1.0, 4.0)                # a factor 4 each way of the default
DEFAULT_GAMMA, DEFAULT_ALPHA_SCALE = 0.5, 1.0
DEFAULT_CURVATURE_FRACTION = MLTPConfig.curvature_fraction   # rho = 1: H_i v on all of task i
BATCH_SIZE, LR = 64, 0.05                      # B per task: 128 samples per optimizer step
IMG_SIZE, HFLIP = 32, 0.5                      # 28x28 upsampled; the models' own default (160) would cost 25x more
SAM_RHO = 0.05                                 # SAM's default radius (Foret et al. 2021)
UNDERFIT_EPOCHS = 4
OVERFIT_EPOCHS = 40                            # 2,000 images, no crop: the training loss approaches zero
OVERFIT_VAL_INTERVAL = 5                       # evaluating 10,000 test images costs more than an epoch on 2,000
RECIPE_EPOCHS = 10                             # on 5,000 images: ~3 min a run on one CPU thread

# timm's usual regularisers, as train.py names them (the engine's TrainArgs takes the same names)
TIMM_RECIPE = {"aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.2, "cutmix": 1.0, "smoothing": 0.1,
               "model_ema": True, "model_ema_decay": 0.999, "model_ema_warmup": True}


@dataclass(frozen=True)
class Setting:
    """A training regime: what every run of the setting shares."""

    epochs: int
    train_samples: tuple[int, ...]      # one group of runs per training-set size
    scale: tuple[float, float]          # RandomResizedCrop's area range
    clip_grad: float | None             # the outer step's gradient norm clipping
    paths: tuple[str, ...] = ("engine",)
    recipe: dict = field(default_factory=dict)   # further TrainArgs options
    about: str = ""                     # the setting in one paragraph, for the report
    pooled: bool = True                 # False: an earlier version of a setting, left out of the pooled tables
    opt: str = "sgd"                    # sgd: the engine's SGD + momentum, the Trainer's plain SGD; adamw: both AdamW
    lr: float = LR
    weight_decay: float | None = None   # None: each path's default (engine 5e-4, Trainer 0)
    warmup_epochs: int = 0
    batch_size: int = BATCH_SIZE        # B, per task
    data: str = "full"                  # full: Fashion-MNIST's 10 classes; finetune: classes 5-9 on a backbone
    #                                     pretrained on classes 0-4 (benchmarks/pretrain_backbone.py)
    eval_every_epoch: bool = True       # False: the test split once, after the last epoch
    models: tuple[str, ...] = MODELS    # the models the setting's matrix runs by default
    seeds: tuple[int, ...] = SEEDS      # and its seeds


ADAMW_LR, ADAMW_WD = 2e-3, 0.05         # the example of issue 16: HF Trainer at lr 2e-3, weight decay 0.05
ADAMW_EPOCHS, ADAMW_SAMPLES, ADAMW_BATCH = 5, 2_000, 32   # B = 32 per task, as in issue 16's example
FINETUNE_LR, FINETUNE_EPOCHS, FINETUNE_BATCH = 1e-3, 15, 16
FINETUNE_SAMPLES = (250, 1_000)         # about 50 and 200 images per class of classes 5-9 (the study ran 250)


# issue 24: real timm architectures at 32 px, trained until the training loss is near zero, on a GPU
# (benchmarks/device_study.sh). One per family: a BatchNorm ResNet, a LayerNorm ConvNeXt, a ViT.
CONVERGED_MODELS = ("resnet18", "convnext_atto", "vit_tiny_patch16_224")
# sized for ~8 min of one H200 shared by 12 runs, whose 16 CPU cores decode and augment every sample (the
# recipe's loader, ~0.3 ms a sample): 3,000 x 30 is ~100k samples a run (benchmarks/device_study.sh)
CONVERGED_EPOCHS, CONVERGED_SAMPLES = 30, (3_000,)
CONVERGED_SEEDS = (0, 1, 2, 3, 4)
CONVERGED_ADAMW_LR, CONVERGED_WARMUP = 1e-3, 2
# timm models need no kwargs at 32 px but the ViT: 4-pixel patches (an 8x8 grid, as test_vit in the study)
STUDY_MODEL_KWARGS = {"vit_tiny_patch16_224": {"patch_size": 4}}
CONVERGED_ABOUT = (
    f"Real timm architectures from random initialisation (`resnet18`, `convnext_atto`, `vit_tiny_patch16_224` "
    f"with 4-pixel patches), {CONVERGED_SAMPLES[0]:,} training images x {CONVERGED_EPOCHS} epochs at 32 px, no "
    f"crop augmentation (the whole image), flip only, no clipping, B = {BATCH_SIZE} per task, cosine schedule, "
    f"evaluated once after the last epoch on the full test split (10,000 images); run on one GPU, several runs "
    f"at once (`benchmarks/device_study.sh`; the device column names the GPU and how many runs shared it, which "
    f"wall times and cost ratios depend on). Issue 24: the regime where the training loss approaches zero and "
    f"standard training varies little between seeds, with the equal-compute baselines.")

# issue 24 on this project's 2-core CPU (no GPU lent): three families sized from one measured run each (one thread,
# 32 px, B = 128 training samples/s: resnet10t 507, convnext_atto 536, mobilenetv3_small_100 532; resnet18 359,
# vit_tiny with 4-pixel patches 34, efficientnet_b0 166: too slow for 5 seeds x 7 runs): 2,000 images x 30 epochs
# (60k samples, ~2.5 min a `none` run) so that the matrix fits about two sessions of both cores. Each family under
# the optimizer of its timm recipe: the ResNet under SGD + momentum, the ConvNeXt under AdamW, the MobileNetV3
# (timm: RMSprop, an adaptive method) under AdamW.
SMALL_SAMPLES, SMALL_EPOCHS = (2_000,), 30
SMALL_ABOUT = (
    f"Real timm architectures from random initialisation, sized for a 2-core CPU (no GPU): "
    f"{SMALL_SAMPLES[0]:,} training images x {SMALL_EPOCHS} epochs at 32 px, no crop augmentation, flip only, no "
    f"clipping, B = {BATCH_SIZE} per task, cosine schedule, evaluated once after the last epoch on the full test split "
    f"(10,000 images), one thread a run, two runs at once. Issue 24: each family under its timm recipe's kind of "
    f"optimizer; `full` at rho = 1, the default README recommends at 32 px on a CPU; the equal-compute baselines "
    f"get the wall-time ratio of the paired runs.")


SETTINGS = {
    "underfit": Setting(
        UNDERFIT_EPOCHS, (20_000,), (0.08, 1.0), 1.0, PATHS,
        about=f"A short run at timm's default training crop (RandomResizedCrop with area scale 0.08-1, flip), "
              f"SGD lr {LR} with a cosine schedule, {UNDERFIT_EPOCHS} epochs, gradient norm clipped at 1.0 (the "
              f"Hugging Face Trainer's default `max_grad_norm`): issue 11's report, where MLTP with alpha = lr "
              f"lost 10 to 40 points. Path `engine` is the recipe (`--clip-grad 1`, SGD momentum 0.9, weight "
              f"decay 5e-4); path `hf-trainer` is `MLTPTrainer` on a `TimmWrapperForImageClassification` built "
              f"from its config, fed as Hugging Face's image-classification example feeds it, at the "
              f"Trainer's defaults otherwise (`optim='sgd'`: no momentum, no weight decay). Alpha rule "
              f"`optimizer-v1`: `fc` and `conv` runs from before 2026-11-29, when the `clip` rule clipped P_S g_i "
              f"by its own norm instead of task i's whole gradient's, which made the inner step on a subset S "
              f"longer than the clipped real step (fo and full: S is every parameter, no change)."),
    "overfit": Setting(
        OVERFIT_EPOCHS, (2_000,), (1.0, 1.0), None, recipe={"val_interval": OVERFIT_VAL_INTERVAL},
        about=f"A small training set, {OVERFIT_EPOCHS} epochs, no crop augmentation (RandomResizedCrop at scale "
              f"1: the whole image), flip only, no clipping, evaluated every {OVERFIT_VAL_INTERVAL} epochs and at "
              f"the end: the training loss approaches zero (column `train loss`) and the network overfits, the "
              f"regime of the paper's CIFAR results, where regularisers such as SAM help. 10,000 images were run "
              f"for 20 epochs (`--train-samples 10000 --epochs 20`: 2.6x the steps of 2,000 x 40, 6 min a run), "
              f"none/fo/SAM only: the training loss ends near 0.09 on test_resnet, but at 0.34-0.40 on "
              f"test_convnext, against test losses of 0.37 and 0.53."),
    "overfit-v1": Setting(
        20, (2_000,), (0.8, 1.0), None, pooled=False,
        about="The first attempt at `overfit` (2026-11-28): 20 epochs, RandomResizedCrop 0.8-1 and flip. The "
              "training loss stayed at 0.37-0.64 (and 0.19 after 60 epochs in a trial run), so these runs are not "
              "in the over-fitted regime; kept for their rows."),
    "timm-recipe": Setting(
        RECIPE_EPOCHS, (5_000,), (0.08, 1.0), None, recipe=TIMM_RECIPE,
        about="The recipe with the regularisers a timm user combines: "
              + ", ".join(f"`{k}` {v}" for k, v in TIMM_RECIPE.items())
              + f"; RandomResizedCrop 0.08-1, flip, {RECIPE_EPOCHS} epochs, no clipping. Mixup and cutmix mix "
                f"within each task. With EMA on, the engine reports (and this study records) the EMA weights' "
                f"top-1, as timm does."),
    "adamw": Setting(
        ADAMW_EPOCHS, (ADAMW_SAMPLES,), (0.08, 1.0), 1.0, PATHS, opt="adamw", lr=ADAMW_LR, weight_decay=ADAMW_WD,
        warmup_epochs=1, batch_size=ADAMW_BATCH, eval_every_epoch=False,
        about=f"From scratch under AdamW, the shape of timm's ViT/ConvNeXt recipes and of the Hugging Face "
              f"Trainer's default: AdamW lr {ADAMW_LR}, weight decay {ADAMW_WD}, cosine, gradient norm clipped at "
              f"1.0, B = {ADAMW_BATCH}, {ADAMW_SAMPLES:,} images x {ADAMW_EPOCHS} epochs, RandomResizedCrop 0.08-1 "
              f"and flip, on a ViT "
              f"(timm `test_vit` at 32 px with 4-pixel patches) and `test_convnext`. Path `engine`: the recipe "
              f"(`--opt adamw`, one warmup epoch); path `hf-trainer`: `MLTPTrainer` at the Trainer's defaults "
              f"(`adamw_torch`, no warmup) with that lr and weight decay: issue 16's example, where the old default "
              f"rule (`optimizer`, then `update` under Adam) lost 3.5 points with `conv`. Alpha rules: `update` "
              f"(that old default: the raw gradient at the length of Adam's last update), `preconditioned` (Adam's "
              f"direction for g_i, without momentum, at that length: what `optimizer` does under Adam since) and, "
              f"through `MLTPTrainer`, `online` (that step times a factor adapted from the cosine); evaluated once, "
              f"after the last epoch."),
    "finetune": Setting(
        FINETUNE_EPOCHS, FINETUNE_SAMPLES, (0.08, 1.0), 1.0, PATHS, opt="adamw", lr=FINETUNE_LR,
        weight_decay=ADAMW_WD, batch_size=FINETUNE_BATCH, data="finetune", eval_every_epoch=False,
        about=f"Fine-tuning a pretrained backbone: each model is first trained with standard training on "
              f"Fashion-MNIST's classes 0-4 (all 30,000 images; `benchmarks/pretrain_backbone.py`, deterministic, "
              f"cached outside git), then fine-tuned with its classifier re-initialised on classes 5-9 from "
              f"{' or '.join(f'{n:,}' for n in FINETUNE_SAMPLES)} images (about 50 or 200 a class, a random subset "
              f"per seed), B = {FINETUNE_BATCH}, AdamW lr {FINETUNE_LR}, weight decay {ADAMW_WD}, cosine, clipping "
              f"1.0, {FINETUNE_EPOCHS} epochs, and evaluated on those classes' 5,000 test images. Path `engine`: the "
              f"recipe with `--pretrained-path`; path `hf-trainer`: `MLTPTrainer` on a TimmWrapper model whose timm "
              f"backbone is loaded from the same file."),
    "short": Setting(
        4, (20_000,), (0.8, 1.0), None, pooled=False,
        about="Issue 5's study: 4 epochs, RandomResizedCrop 0.8-1 and flip, no clipping, MLTP with alpha = lr "
              "x alpha_scale (rule `lr`), plus a gamma x alpha_scale grid. Rows written before the CSV had a "
              "`setting` column are this setting's."),
    "converged": Setting(
        CONVERGED_EPOCHS, CONVERGED_SAMPLES, (1.0, 1.0), None, eval_every_epoch=False, models=CONVERGED_MODELS,
        seeds=CONVERGED_SEEDS,
        about=CONVERGED_ABOUT + f" SGD + momentum 0.9, lr {LR}, weight decay 5e-4 (the engine's defaults)."),
    "converged-adamw": Setting(
        CONVERGED_EPOCHS, CONVERGED_SAMPLES, (1.0, 1.0), None, opt="adamw", lr=CONVERGED_ADAMW_LR,
        weight_decay=ADAMW_WD, warmup_epochs=CONVERGED_WARMUP, eval_every_epoch=False, models=CONVERGED_MODELS[1:],
        seeds=CONVERGED_SEEDS,
        about=CONVERGED_ABOUT + f" AdamW (the optimizer of timm's ConvNeXt and ViT recipes), lr "
                                f"{CONVERGED_ADAMW_LR}, weight decay {ADAMW_WD}, {CONVERGED_WARMUP} warmup epochs."),
    "converged-small": Setting(
        SMALL_EPOCHS, SMALL_SAMPLES, (1.0, 1.0), None, eval_every_epoch=False, models=("resnet10t",),
        seeds=CONVERGED_SEEDS,
        about=SMALL_ABOUT + f" `resnet10t` under SGD + momentum 0.9, lr {LR}, weight decay 5e-4 (the engine's "
                            f"defaults)."),
    "converged-small-adamw": Setting(
        SMALL_EPOCHS, SMALL_SAMPLES, (1.0, 1.0), None, opt="adamw", lr=CONVERGED_ADAMW_LR, weight_decay=ADAMW_WD,
        warmup_epochs=CONVERGED_WARMUP, eval_every_epoch=False, models=("convnext_atto", "mobilenetv3_small_100"),
        seeds=CONVERGED_SEEDS,
        about=SMALL_ABOUT + f" `convnext_atto` and `mobilenetv3_small_100` under AdamW, lr {CONVERGED_ADAMW_LR}, "
                            f"weight decay {ADAMW_WD}, {CONVERGED_WARMUP} warmup epochs."),
}


QUICK = dict(setting="underfit", methods=("none", "fo", "sam"), models=("test_convnext",), seeds=(0,), epochs=1,
             train_samples=256)


@dataclass(frozen=True)
class Run:
    setting: str
    path: str
    method: str
    model: str
    seed: int
    epochs: int
    train_samples: int
    alpha_rule: str                     # "-" for none and sam
    gamma: float = DEFAULT_GAMMA
    alpha_scale: float = DEFAULT_ALPHA_SCALE
    curvature_fraction: float = DEFAULT_CURVATURE_FRACTION   # rho: H_i v on this share of task i; 1 for none and sam
    # issue 24, the equal-compute baseline: a `none` run given the measured compute of method `compute_of` in the
    # group of `base_epochs` epochs: epochs = equal_compute_epochs(base_epochs, cost_ratio), the same schedule shape
    compute_of: str = ""
    base_epochs: int = 0                # 0: not an equal-compute run (its group is its own epochs)
    cost_ratio: float | None = None     # the measured cost ratio its epochs came from (not part of the key)


def equal_compute_epochs(base_epochs: int, cost_ratio: float) -> int:
    """Epochs of standard training that cost what `base_epochs` of a method `cost_ratio` times as costly do:
    the nearest whole epoch (halves up), never fewer than the method's own."""
    return max(base_epochs, math.floor(base_epochs * cost_ratio + 0.5))
