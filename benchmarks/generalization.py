"""Where does MLTP generalise better than standard training and SAM on the same data budget? (issues 5, 11)

A matrix of training runs on Fashion-MNIST per *setting* (a training regime), each method on each model and
seed. Each optimizer step consumes 2B samples for every method: MLTP takes them as task i and task j, `none`
as two batches of standard training, SAM as one batch of 2B taken twice (at w, then at w + e(w)).

    underfit     a short run at timm's default crop (RandomResizedCrop 0.08-1 + flip), SGD lr 0.05 + cosine,
                 gradient norm clipped at 1.0, through two paths: `engine` (timm_mltp.engine.Trainer, the
                 recipe) and `hf-trainer` (MLTPTrainer on a TimmWrapperForImageClassification, HF defaults)
    overfit      2,000 training images (40 epochs; 10,000 for 20 with --train-samples/--epochs), trained until the
                 training loss is near zero
    timm-recipe  the recipe with RandAugment, random erasing, mixup/cutmix, label smoothing and EMA
    short        issue 5's study (4 epochs, 20,000 images, no clipping, alpha = lr), kept for its rows

One row per finished run is appended to a CSV; runs already there are skipped, so a matrix can be filled over
several sessions, and `--report` turns the CSV into docs/generalization.md and .png.

    python benchmarks/generalization.py --setting underfit --jobs 2       # one setting's matrix, both cores
    python benchmarks/generalization.py --setting overfit --alpha-rule lr --jobs 2   # another inner-step rule
    python benchmarks/generalization.py --report                          # regenerate the doc and plot
    python benchmarks/generalization.py --quick --csv /tmp/q.csv          # smoke test, < 1 min

Benchmark-only dependency: matplotlib (the plot).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import itertools
import importlib.util
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

from timm_mltp.accelerate_utils import mltp_autocast  # noqa: E402
from timm_mltp.data import apply_transforms, collate_image_batch, create_transforms, load_image_dataset  # noqa: E402
from timm_mltp.engine import TrainArgs, Trainer  # noqa: E402
from timm_mltp.errors import MLTPConfigError  # noqa: E402
from timm_mltp.mltp import ALPHA_RULES, MLTPConfig, MLTPStats  # noqa: E402
from timm_mltp.passes import frozen_running_stats as _frozen_running_stats  # noqa: E402
from timm_mltp.selection import select_parameters  # noqa: E402

from pretrain_backbone import MODEL_KWARGS, backbone_path, class_split, pretrain  # noqa: E402  (benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_CSV = ROOT / "benchmarks" / "results" / "generalization.csv"
QUICK_CSV = ROOT / "output" / "generalization-quick.csv"
DOC = ROOT / "docs" / "generalization.md"
FULL_DATA = ROOT / "data" / "fashion-mnist-full"

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


ADAMW_LR, ADAMW_WD = 2e-3, 0.05         # the example of issue 16: HF Trainer at lr 2e-3, weight decay 0.05
ADAMW_EPOCHS, ADAMW_SAMPLES = 5, 4_000
FINETUNE_LR, FINETUNE_EPOCHS, FINETUNE_BATCH = 1e-3, 15, 16
FINETUNE_SAMPLES = (250, 1_000)         # about 50 and 200 images per class of classes 5-9 (the study ran 250)


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
        warmup_epochs=1, eval_every_epoch=False,
        about=f"From scratch under AdamW, the shape of timm's ViT/ConvNeXt recipes and of the Hugging Face "
              f"Trainer's default: AdamW lr {ADAMW_LR}, weight decay {ADAMW_WD}, cosine, gradient norm clipped at "
              f"1.0, {ADAMW_SAMPLES:,} images x {ADAMW_EPOCHS} epochs, RandomResizedCrop 0.08-1 and flip, on a ViT "
              f"(timm `test_vit` at 32 px with 4-pixel patches) and `test_convnext`. Path `engine`: the recipe "
              f"(`--opt adamw`, one warmup epoch); path `hf-trainer`: `MLTPTrainer` at the Trainer's defaults "
              f"(`adamw_torch`, no warmup) with that lr and weight decay: issue 16's example, where the old default "
              f"rule (`optimizer`, which is `update` under Adam) lost 3.5 points with `conv`. Alpha rules: "
              f"`optimizer` (the old default), `preconditioned` (Adam's own step on g_i, without momentum) and "
              f"`online` (that step times a factor adapted from the cosine); evaluated once, after the last epoch."),
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
}

QUICK = dict(setting="underfit", methods=("none", "fo", "sam"), models=("test_convnext",), seeds=(0,), epochs=1,
             train_samples=256)

COLUMNS = ["device", "setting", "path", "method", "model", "seed", "epochs", "train_samples", "alpha_rule",
           "samples_seen", "optimizer_steps", "wall_seconds", "final_top1", "best_top1", "test_loss",
           "final_train_loss", "mean_grad_cosine", "mean_relative_step", "mean_update_ratio", "gamma", "alpha_scale",
           "batch_size", "lr", "mean_second_order_share"]
TEXT_COLUMNS = ("device", "setting", "path", "method", "model", "alpha_rule")
KEY_TYPES = {"device": str, "setting": str, "path": str, "method": str, "model": str, "seed": int, "epochs": int,
             "train_samples": int, "alpha_rule": str, "gamma": float, "alpha_scale": float}


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


# ---- SAM, for both paths ----------------------------------------------------------------------------

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


# ---- data -----------------------------------------------------------------------------------------

def ensure_full_dataset() -> Path:
    """Convert the full Fashion-MNIST once (scripts/make_fashion_mnist.py --full), atomically: a killed
    conversion must not leave a folder that later runs take for complete."""
    if (FULL_DATA / "dataset_dict.json").is_file():
        return FULL_DATA
    spec = importlib.util.spec_from_file_location("make_fashion_mnist", ROOT / "scripts" / "make_fashion_mnist.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    source = maker.find_source(None)   # ../shared/data/fashion-mnist beside the checkout first; exits if absent
    partial = FULL_DATA.with_name(FULL_DATA.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"converting the full Fashion-MNIST from {source} into {FULL_DATA} (once)")
    maker.write_full(source, partial)
    partial.rename(FULL_DATA)
    return FULL_DATA


# ---- one run, through either path -------------------------------------------------------------------

def device_name(threads: int) -> str:
    """Part of every run's key: wall times compare only on one device and thread count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu, info = platform.processor() or platform.machine(), Path("/proc/cpuinfo")
    if info.is_file():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"cpu {cpu}, {threads} thread{'s' if threads > 1 else ''}"


def run_data(run: Run, dataset: Path | None) -> tuple[Path | None, Path | None]:
    """The run's dataset and, for `finetune`, the pretrained backbone it starts from (built where missing)."""
    if SETTINGS[run.setting].data != "finetune" or dataset is None:
        return dataset, None
    return class_split(dataset, "5to9"), pretrain(run.model, dataset)


def train_options(run: Run, dataset: Path | None, output: str) -> dict:
    setting = SETTINGS[run.setting]
    dataset, backbone = run_data(run, dataset)
    optimizer = {} if setting.opt == "sgd" else {"opt": setting.opt, "warmup_epochs": setting.warmup_epochs}
    if setting.weight_decay is not None:
        optimizer["weight_decay"] = setting.weight_decay
    if backbone is not None:
        optimizer["pretrained_path"] = str(backbone)
    if not setting.eval_every_epoch:
        optimizer["val_interval"] = run.epochs
    return dict(model=run.model, dataset=None if dataset is None else str(dataset), img_size=IMG_SIZE,
                max_train_samples=run.train_samples, scale=setting.scale, hflip=HFLIP, batch_size=setting.batch_size,
                epochs=run.epochs, lr=setting.lr, clip_grad=setting.clip_grad,
                variant="none" if run.method == "sam" else run.method, gamma=run.gamma, alpha_scale=run.alpha_scale,
                alpha_rule=None if run.method in BASELINES else run.alpha_rule, seed=run.seed, output=output,
                experiment=f"{run.model}-{run.method}-s{run.seed}", progress=False, workers=0,
                model_kwargs=MODEL_KWARGS.get(run.model, {}), **optimizer, **setting.recipe)


def missing_options(setting: str) -> list[str]:
    """The setting's options that the engine's TrainArgs does not (yet) have."""
    known = {f.name for f in fields(TrainArgs)}
    return [name for name in train_options(Run(setting, "engine", "none", MODELS[0], 0, 1, 1, "-"), None, "")
            if name not in known]


def train_args(run: Run, dataset: Path | None, output: str) -> TrainArgs:
    return TrainArgs(**train_options(run, dataset, output))


def fit_engine(run: Run, dataset: Path | None, output: str) -> dict:
    args = train_args(run, dataset, output)
    return (SAMTrainer(args) if run.method == "sam" else Trainer(args)).fit()


def fit_hf_trainer(run: Run, dataset: Path | None, output: str) -> dict:
    """The run as a Hugging Face user writes it: a TimmWrapper model built from its config (random init,
    offline), `with_transform` data and a collator, MLTPTrainer at the Trainer's defaults but for SGD at the
    setting's lr, cosine, and the setting's clipping as `max_grad_norm`. The engine's subset and transforms."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, set_seed

    from timm_mltp.trainer import MLTPTrainingArguments

    setting = SETTINGS[run.setting]
    dataset, backbone = run_data(run, dataset)
    data = load_image_dataset(None if dataset is None else str(dataset))
    set_seed(run.seed)
    config = TimmWrapperConfig(architecture=run.model, num_labels=data.num_classes,
                               model_args=MODEL_KWARGS.get(run.model, {}) | ({"img_size": IMG_SIZE}
                                                                             if run.model in MODEL_KWARGS else {}))
    model = TimmWrapperForImageClassification(config)
    if backbone is not None:   # the backbone's weights; the classifier keeps its fresh initialisation
        missing, unexpected = model.timm_model.load_state_dict(torch.load(backbone, weights_only=True), strict=False)
        classifier = model.timm_model.pretrained_cfg.get("classifier", "head")
        if unexpected or any(not k.startswith(classifier + ".") for k in missing):
            raise RuntimeError(f"{backbone} does not fit {run.model}: missing {missing}, unexpected {unexpected}")
    train_tf = create_transforms(model.timm_model, img_size=IMG_SIZE, scale=setting.scale, hflip=HFLIP,
                                 color_jitter=0.0)
    eval_tf = create_transforms(model.timm_model, img_size=IMG_SIZE, is_training=False, crop_pct=1.0)
    train = data.train.shuffle(seed=run.seed).select(range(min(run.train_samples, data.train.num_rows)))
    train = apply_transforms(train, train_tf, data.image_column, data.label_column)
    test = apply_transforms(data.eval, eval_tf, data.image_column, data.label_column)
    rule = {} if run.method in BASELINES else {"mltp_alpha_rule": run.alpha_rule}
    # the Trainer's defaults, but for the setting's optimizer (its default: AdamW), lr and weight decay
    optimizer = {"optim": "sgd"} if setting.opt == "sgd" else {}
    if setting.weight_decay is not None:
        optimizer["weight_decay"] = setting.weight_decay
    args = MLTPTrainingArguments(
        output_dir=output, per_device_train_batch_size=setting.batch_size,
        per_device_eval_batch_size=4 * setting.batch_size, learning_rate=setting.lr, lr_scheduler_type="cosine",
        num_train_epochs=run.epochs, **optimizer,
        max_grad_norm=setting.clip_grad or 0.0, eval_strategy="epoch" if setting.eval_every_epoch else "no",
        logging_strategy="epoch",
        save_strategy="no", report_to="none", disable_tqdm=True, seed=run.seed,
        mltp_variant="none" if run.method == "sam" else run.method, mltp_gamma=run.gamma,
        mltp_alpha_scale=run.alpha_scale, **rule)

    def top1(prediction):
        return {"top1": 100.0 * float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = hf_trainer_class(run.method)(model=model, args=args, train_dataset=train, eval_dataset=test,
                                           data_collator=collate_image_batch, compute_metrics=top1)
    start = time.time()
    trainer.train()
    if not setting.eval_every_epoch:
        trainer.evaluate()
    wall_seconds = time.time() - start
    # one training log (the epoch's means) per epoch, and one evaluation per epoch or after the last
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    eval_logs = [h for h in history if "eval_top1" in h]
    eval_logs = [{}] * (len(train_logs) - len(eval_logs)) + eval_logs
    rows = [{"train_loss": t["loss"], "eval_loss": e.get("eval_loss"), "eval_top1": e.get("eval_top1"),
             **{k: t.get(f"mltp_{k}", math.nan) for k in MLTP_LOGGED}}
            for t, e in zip(train_logs, eval_logs)]
    return {"rows": rows, "optimizer_steps": trainer.state.global_step, "wall_seconds": wall_seconds}


def finite_mean(values) -> float | str:
    """Mean of the finite values, to 4 significant digits; "" when there are none (SAM's cosine)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(f"{statistics.fmean(finite):.4g}") if finite else ""


MLTP_LOGGED = ("grad_cosine", "relative_step", "update_ratio", "second_order_share")


def execute(run: Run, dataset: Path | None, device: str, threads: int) -> dict:
    """Train one run in a throw-away output folder (the checkpoints are not needed) and make its CSV row."""
    torch.set_num_threads(threads)
    fit = fit_engine if run.path == "engine" else fit_hf_trainer
    with tempfile.TemporaryDirectory(prefix="generalization-") as output:
        result = fit(run, dataset, output)
    rows, batch = result["rows"], SETTINGS[run.setting].batch_size
    evaluated = [r for r in rows if r.get("eval_top1") is not None]
    return {"device": device, **asdict(run),
            "samples_seen": result["optimizer_steps"] * 2 * batch, "optimizer_steps": result["optimizer_steps"],
            "wall_seconds": round(result["wall_seconds"], 2), "final_top1": round(evaluated[-1]["eval_top1"], 3),
            "best_top1": round(max(r["eval_top1"] for r in evaluated), 3),
            "test_loss": round(evaluated[-1]["eval_loss"], 5), "final_train_loss": round(rows[-1]["train_loss"], 5),
            "mean_grad_cosine": finite_mean(r["grad_cosine"] for r in rows),
            "mean_relative_step": finite_mean(r["relative_step"] for r in rows),
            "mean_update_ratio": finite_mean(r["update_ratio"] for r in rows),
            "mean_second_order_share": finite_mean(r.get("second_order_share") for r in rows),
            "batch_size": batch, "lr": SETTINGS[run.setting].lr}


def _execute(job: tuple) -> dict:
    return execute(*job)


# ---- the matrix -----------------------------------------------------------------------------------

@functools.cache
def has_more_than_head(model_name: str) -> bool:
    """Whether `fc` selects more than the classifier: otherwise it is the `head` preset, not a variant to study."""
    model = timm.create_model(model_name, num_classes=10)
    try:
        return set(select_parameters(model, "fc")) > set(select_parameters(model, "head"))
    except MLTPConfigError:   # no linear module at all
        return False


def plan(setting: str, matrix: str, methods, models, seeds, alpha_rule: str, paths=None, epochs: int | None = None,
         train_samples=None) -> list[Run]:
    """main: every path x training-set size x model x seed x method; sensitivity: gamma x alpha_scale of one
    method on the first model, seed and size, through the engine. A cell planned twice is planned once."""
    s = SETTINGS[setting]
    epochs, sizes, paths = epochs or s.epochs, train_samples or s.train_samples, paths or s.paths

    def run(path, method, model, seed, n, gamma=DEFAULT_GAMMA, alpha_scale=DEFAULT_ALPHA_SCALE):
        rule = "-" if method in BASELINES else alpha_rule
        return Run(setting, path, method, model, seed, epochs, n, rule, gamma, alpha_scale)

    runs = []
    if matrix in ("main", "all"):
        runs += [run(path, method, model, seed, n) for path in paths for n in sizes for model in models
                 for seed in seeds for method in methods if method != "fc" or has_more_than_head(model)]
    if matrix in ("sensitivity", "all"):
        runs += [run("engine", SENSITIVITY_METHOD, models[0], seeds[0], sizes[0], g, a)
                 for g in GAMMAS for a in ALPHA_SCALES]
    return list(dict.fromkeys(runs))


def key(row: dict) -> tuple:
    return tuple(cast(row[k]) for k, cast in KEY_TYPES.items())


def upgraded(row: dict) -> dict:
    """A row in today's columns. Rows written before issue 11 lack setting, path and alpha_rule: every one
    of them was a `short` run through the engine, with alpha = lr (rule `lr`) for MLTP."""
    before = {"setting": "short", "path": "engine", "alpha_rule": "-" if row["method"] in BASELINES else "lr"}
    return {c: row[c] if row.get(c) is not None else before.get(c, "") for c in COLUMNS}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [upgraded(row) for row in csv.DictReader(f)]


def append_row(path: Path, row: dict) -> None:
    """Append one run. A CSV in an older column layout is first rewritten (atomically) in today's, its rows
    kept, so files filled over several sessions stay one table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            rows = read_rows(path)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def run_matrix(runs: list[Run], csv_path: Path, dataset: Path | None, threads: int, jobs: int) -> None:
    device = device_name(threads)
    done = {key(r) for r in read_rows(csv_path)}
    pending = [r for r in runs if key({"device": device, **asdict(r)}) not in done]
    print(f"{len(runs)} runs planned, {len(runs) - len(pending)} already in {csv_path}, {len(pending)} to go ({device})")
    work = [(r, dataset, device, threads) for r in pending]
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(work) > 1:
            # whole runs in parallel, one writer (this process). spawn: forking a process that holds torch's
            # thread pools can hang. imap_unordered hands the next run to whichever worker is free.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(jobs))
            results = pool.imap_unordered(_execute, work)
        else:
            results = map(_execute, work)
        for row in results:
            append_row(csv_path, row)       # at once: a stopped matrix keeps every finished run
            print(f"done: {row['setting']} {row['path']} {row['model']} {row['method']} seed {row['seed']}: "
                  f"top-1 {row['final_top1']}")


# ---- the report -----------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], digits: int = 2, spec: str = "f") -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    text = f"{mean:.{digits}{spec}}"
    if std is not None:
        text += f" ± {std:.{digits}{spec}}"
    return f"{text} (n={len(values)})"


def numeric(rows: list[dict]) -> list[dict]:
    """CSV strings to numbers; an empty cell (SAM's gradient cosine, an old row's inner step) becomes nan."""
    out = []
    for row in rows:
        typed = dict(row)
        for column in COLUMNS:
            if column not in TEXT_COLUMNS:
                typed[column] = float(row[column]) if row[column] != "" else math.nan
        out.append(typed)
    return out


def _order(items, known) -> list:
    return [x for x in known if x in items] + sorted(set(items) - set(known))


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(setting, path, training samples, epochs, device) -> runs: what must match for runs to be compared."""
    by_key = defaultdict(list)
    for row in rows:
        by_key[row["setting"], row["path"], int(row["train_samples"]), int(row["epochs"]), row["device"]].append(row)
    settings, paths = _order({k[0] for k in by_key}, SETTINGS), _order({k[1] for k in by_key}, PATHS)
    return dict(sorted(by_key.items(), key=lambda kv: (settings.index(kv[0][0]), paths.index(kv[0][1]), kv[0][2],
                                                       -len(kv[1]))))


def main_cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(model, method, alpha_rule) -> runs at the default gamma and alpha_scale, one per seed."""
    cells = defaultdict(list)
    for row in rows:
        if row["gamma"] == DEFAULT_GAMMA and row["alpha_scale"] == DEFAULT_ALPHA_SCALE:
            cells[row["model"], row["method"], row["alpha_rule"]].append(row)
    return cells


def cell_order(cells) -> list[tuple]:
    models = sorted({c[0] for c in cells})
    methods = _order({c[1] for c in cells}, METHODS)
    rules = _order({c[2] for c in cells}, ("-", DEFAULT_RULE))
    return [(m, method, r) for m in models for method in methods for r in rules if (m, method, r) in cells]


def paired_differences(cells, cell: tuple, baseline: str, column: str = "final_top1") -> list[float]:
    """Per seed: the cell minus `baseline` on the same model and seed (same initialisation, subset, data order)."""
    base = {r["seed"]: r[column] for r in cells.get((cell[0], baseline, "-"), [])}
    return [r[column] - base[r["seed"]] for r in cells.get(cell, []) if r["seed"] in base]


def cost_ratio(cells, cell: tuple) -> float | None:
    """Mean wall time relative to `none` on the same model (training and the per-epoch evaluation)."""
    base, own = cells.get((cell[0], "none", "-")), cells.get(cell)
    if not base or not own:
        return None
    return statistics.fmean(r["wall_seconds"] for r in own) / statistics.fmean(r["wall_seconds"] for r in base)


def finite(runs: list[dict], column: str) -> list[float]:
    return [r[column] for r in runs if math.isfinite(r[column])]


def label(cell: tuple) -> str:
    model, method, rule = cell
    return f"{method} on {model}" if rule == "-" else f"{method} ({rule}) on {model}"


def main_table(rows: list[dict]) -> list[str]:
    cells = main_cells(rows)
    lines = ["| model | method | alpha rule | final top-1 | test loss | train loss | top-1 - none, paired | "
             "top-1 - SAM, paired | relative inner step | inner / last update | wall time vs none |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell in cell_order(cells):
        runs = cells[cell]
        model, method, rule = cell
        vs_none = paired_differences(cells, cell, "none") if method != "none" else []
        vs_sam = paired_differences(cells, cell, "sam") if method != "sam" else []
        ratio = cost_ratio(cells, cell)
        seconds = statistics.fmean(r["wall_seconds"] for r in runs)
        inner = [] if method in BASELINES else finite(runs, "mean_relative_step")
        cost = f"{ratio:.2f}x ({seconds:.0f} s)" if ratio else f"- ({seconds:.0f} s)"
        lines.append(f"| {model} | {method} | {rule} | {fmt([r['final_top1'] for r in runs])} | "
                     f"{fmt([r['test_loss'] for r in runs], 4)} | {fmt([r['final_train_loss'] for r in runs], 4)} | "
                     f"{fmt(vs_none)} | {fmt(vs_sam)} | {fmt(inner, 1, 'e')} | "
                     f"{fmt([] if method in BASELINES else finite(runs, 'mean_update_ratio'))} | {cost} |")
    return lines


def compare(diffs: list[float]) -> str | None:
    """better / worse: the mean paired difference exceeds its seed-to-seed std; same: it does not."""
    if len(diffs) < 2:
        return None
    mean, std = mean_std(diffs)
    if abs(mean) <= std:
        return "same"
    return "better" if mean > 0 else "worse"


def difference(diffs: list[float]) -> str:
    mean, std = mean_std(diffs)
    return f"{mean:+.2f} ± {std:.2f}" if std is not None else f"{mean:+.2f}"


def verdict(rows: list[dict]) -> list[str]:
    """What a user should do in this group, computed from the numbers: its first line is the verdict."""
    cells = main_cells(rows)
    models = sorted({c[0] for c in cells})
    mltp = [c for c in cell_order(cells) if c[1] not in BASELINES]
    short = [f"{label(c)} ({len(cells[c])})" for c in cell_order(cells) if len(cells[c]) < len(SEEDS)]
    no_baseline = [m for m in models if (m, "none", "-") not in cells]
    if short or no_baseline or not mltp:
        missing = short + [f"none on {m} (0)" for m in no_baseline] + ([] if mltp else ["any MLTP variant (0)"])
        return [f"**Not enough runs** for a verdict: {len(SEEDS)} seeds per cell are needed; seeds so far: "
                f"{', '.join(missing)}."]
    vs_none = {c: paired_differences(cells, c, "none") for c in mltp}
    vs_sam = {c: paired_differences(cells, c, "sam") for c in mltp}
    helps = [c for c in mltp if compare(vs_none[c]) == "better"]
    hurts = [c for c in mltp if compare(vs_none[c]) == "worse"]

    def described(c):
        text = f"{label(c)} ({difference(vs_none[c])} vs none"
        if vs_sam[c]:
            text += f", {difference(vs_sam[c])} vs SAM"
        ratio = cost_ratio(cells, c)
        return text + (f", {ratio:.2f}x the time)" if ratio else ")")

    if helps:
        beats_sam = [c for c in helps if compare(vs_sam[c]) == "better"]
        verb = "beats" if len(helps) == 1 else "beat"
        lines = [f"**MLTP helps here**: {'; '.join(map(described, helps))} {verb} standard training by more than "
                 f"the seed-to-seed spread of the paired differences."]
        if beats_sam:
            verb = "beats" if len(beats_sam) == 1 else "beat"
            lines[0] += f" Of these, {', '.join(map(label, beats_sam))} also {verb} SAM."
        elif not any(vs_sam[c] for c in helps):
            lines[0] += " SAM was not run here."
        else:
            lines[0] += " None of them beats SAM by more than that spread."
    else:
        lines = [f"**MLTP does not help here**: no MLTP variant beats standard training (`none`) by more than the "
                 f"seed-to-seed spread of the paired differences on {', '.join(models)}; train without MLTP."]
    if hurts:
        lines.append(f"- Worse than standard training: {'; '.join(map(described, hurts))}.")
    for model in models:
        sam = paired_differences(cells, (model, "sam", "-"), "none")
        if sam:
            outcome = {"better": "a gain", "worse": "a loss", "same": "within the spread", None: "one seed"}
            lines.append(f"- SAM on {model}: {difference(sam)} vs none ({outcome[compare(sam)]}).")
    lines += safety(cells, mltp)
    return lines


def safety(cells, mltp: list[tuple]) -> list[str]:
    """Issue 11's test of a default rule: it may lose no more than the seed-to-seed std of standard training,
    and its inner step must not vanish (alpha -> 0 is standard training)."""
    default = [c for c in mltp if c[2] == DEFAULT_RULE]
    if not default:
        return []
    losses = []
    for c in default:
        spread = mean_std([r["final_top1"] for r in cells[(c[0], "none", "-")]])[1] or 0.0
        mean = statistics.fmean(paired_differences(cells, c, "none"))
        if mean < -spread:
            losses.append(f"{label(c)} ({mean:+.2f}, std of none {spread:.2f})")
    steps = [x for c in default for x in finite(cells[c], "mean_relative_step")]
    inner = f"; its relative inner step ranges {min(steps):.1e} to {max(steps):.1e}" if steps else ""
    if losses:
        return [f"- The default rule `{DEFAULT_RULE}` loses more than the seed-to-seed std of standard training: "
                f"{'; '.join(losses)}{inner}."]
    return [f"- The default rule `{DEFAULT_RULE}` loses no more than the seed-to-seed std of standard training "
            f"on any variant and model{inner}."]


def findings(rows: list[dict]) -> list[str]:
    """Per MLTP cell and SAM: the paired difference to `none`, what it means, and the cost."""
    cells, lines = main_cells(rows), []
    for cell in cell_order(cells):
        diffs = paired_differences(cells, cell, "none") if cell[1] != "none" else []
        if not diffs:
            continue
        outcome = {None: "one seed only: no spread to compare it with",
                   "same": "within the seed-to-seed std of the differences: not distinguishable from `none`",
                   "better": "a consistent gain", "worse": "a consistent loss"}[compare(diffs)]
        ratio = cost_ratio(cells, cell)
        lines.append(f"- {label(cell)}: {difference(diffs)} points vs `none` over {len(diffs)} paired seed(s), "
                     f"{outcome}" + (f"; {ratio:.2f}x the wall time of `none`." if ratio else "."))
    return lines


SIGN_FLIP_EXACT = 16       # pairs up to which the sign-flip test enumerates every pattern (2^16)
SIGN_FLIP_DRAWS = 1 << 16  # random patterns beyond that


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided p of the paired sign-flip test: the share of the 2^n ways to flip the signs of the
    differences whose |sum| is at least the observed |sum|. No normality assumed; with n = 3 the smallest p
    is 2/8 = 0.25, so one cell of 3 seeds can hint at a gain but never show one. Exact up to
    SIGN_FLIP_EXACT pairs; beyond, from SIGN_FLIP_DRAWS random patterns (fixed seed), counting the observed one."""
    observed = abs(sum(diffs)) - 1e-9 * (1 + sum(map(abs, diffs)))   # ties count as at least as extreme
    if len(diffs) <= SIGN_FLIP_EXACT:
        flips = list(itertools.product((1, -1), repeat=len(diffs)))
        return sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed for signs in flips) / len(flips)
    signs = torch.randint(0, 2, (SIGN_FLIP_DRAWS, len(diffs)), generator=torch.Generator().manual_seed(0)) * 2 - 1
    sums = (signs.double() @ torch.tensor(diffs, dtype=torch.float64)).abs()
    return (1 + int((sums >= observed).sum())) / (1 + SIGN_FLIP_DRAWS)


def pooled_differences(rows: list[dict]) -> dict[tuple, dict[str, list[float]]]:
    """(model, method, alpha_rule) -> {"none": [...], "sam": [...]}: the paired differences of every group of
    the current settings, pooled. Each difference still pairs two runs of one group and seed."""
    pooled = defaultdict(lambda: defaultdict(list))
    for group, runs in groups(rows).items():
        if group[0] not in SETTINGS or not SETTINGS[group[0]].pooled:
            continue
        cells = main_cells(runs)
        for cell in cells:
            if cell[1] == "none" or cell[2] not in ("-", DEFAULT_RULE):
                continue
            for baseline in BASELINES:
                if cell[1] != baseline:
                    pooled[cell][baseline] += paired_differences(cells, cell, baseline)
    return pooled


def p_value(p: float) -> str:
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}"


def pooled_table(rows: list[dict]) -> list[str]:
    """Every current setting's paired differences of one method and model together, with the sign-flip p."""
    pooled = pooled_differences(rows)
    if not pooled:
        return []
    lines = ["| model | method | alpha rule | pairs | top-1 - none | better / worse | p (sign flip) | top-1 - SAM | "
             "p (sign flip) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell in cell_order(pooled):
        vs_none, vs_sam = pooled[cell]["none"], pooled[cell]["sam"]
        if not vs_none:
            continue
        wins, losses = sum(d > 0 for d in vs_none), sum(d < 0 for d in vs_none)
        sam = f"{fmt(vs_sam)} | {p_value(sign_flip_p(vs_sam))}" if vs_sam else "- | -"
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | {len(vs_none)} | {fmt(vs_none)} | {wins} / {losses} | "
                     f"{p_value(sign_flip_p(vs_none))} | {sam} |")
    return lines


def pooled_findings(rows: list[dict], level: float = 0.05) -> list[str]:
    """The cells whose pooled differences a sign-flip test tells from zero at `level`."""
    pooled = pooled_differences(rows)
    found = [(cell, pooled[cell]["none"]) for cell in cell_order(pooled) if pooled[cell]["none"]]
    gains = [f"{label(c)} ({difference(d)}, p {p_value(sign_flip_p(d))})" for c, d in found
             if sign_flip_p(d) < level and statistics.fmean(d) > 0]
    losses = [f"{label(c)} ({difference(d)}, p {p_value(sign_flip_p(d))})" for c, d in found
              if sign_flip_p(d) < level and statistics.fmean(d) < 0]
    lines = [f"- Better than standard training over all current settings (p < {level}): "
             f"{'; '.join(gains) if gains else 'none'}.",
             f"- Worse than standard training over all current settings (p < {level}): "
             f"{'; '.join(losses) if losses else 'none'}."]
    return lines


def sensitivity_grids(rows: list[dict]) -> dict[tuple, dict[tuple, list[float]]]:
    """(model, method, alpha_rule) -> {(gamma, alpha_scale): final top-1 values}, where more than one cell was
    run. Only seeds that every cell has count: the default cell also holds the main matrix's other seeds,
    and comparing a 3-seed mean with 1-seed cells would mix seed noise into the grid."""
    grids = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["method"] not in BASELINES:  # gamma and alpha do nothing for these
            name = (row["model"], row["method"], row["alpha_rule"])
            grids[name][row["gamma"], row["alpha_scale"]][row["seed"]] = row["final_top1"]
    out = {}
    for name, grid in grids.items():
        common = set.intersection(*(set(by_seed) for by_seed in grid.values()))
        if len(grid) > 1 and common:
            out[name] = {cell: [by_seed[s] for s in sorted(common)] for cell, by_seed in grid.items()}
    return out


def sensitivity_table(grid: dict[tuple, list[float]]) -> list[str]:
    gammas, scales = sorted({g for g, _ in grid}), sorted({a for _, a in grid})
    lines = ["| gamma \\ alpha_scale | " + " | ".join(f"{a:g}" for a in scales) + " |",
             "| --- |" + " --- |" * len(scales)]
    for g in gammas:
        lines.append(f"| {g:g} | " + " | ".join(fmt(grid.get((g, a), [])) for a in scales) + " |")
    return lines


def sensitivity_findings(rows: list[dict]) -> list[str]:
    cells, lines = main_cells(rows), []
    for (model, method, rule), grid in sensitivity_grids(rows).items():
        means = {cell: statistics.fmean(v) for cell, v in grid.items()}
        best, worst = max(means, key=means.get), min(means, key=means.get)
        seed_std = mean_std([r["final_top1"] for r in cells.get((model, method, rule), [])])[1]
        spread = means[best] - means[worst]
        line = (f"- Sensitivity ({model}, {method}, rule {rule}): top-1 ranges {spread:.2f} points over the grid, "
                f"best at gamma {best[0]:g}, alpha_scale {best[1]:g} ({means[best]:.2f}), worst at gamma "
                f"{worst[0]:g}, alpha_scale {worst[1]:g} ({means[worst]:.2f})")
        if seed_std:
            larger = "larger" if spread > seed_std else "not larger"
            line += f"; the seed-to-seed std at the default is {seed_std:.2f}, so the range is {larger} than seed noise"
        lines.append(line + ".")
    return lines


def group_title(group: tuple) -> str:
    setting, path, train_samples, epochs, device = group
    return f"{path}, {train_samples:,} training images, {epochs} epoch(s) ({device})"


def plot(rows: list[dict], path: Path) -> bool:
    """One panel per group: each cell's top-1 minus `none`'s on the same seed. False: nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [(g, main_cells(runs)) for g, runs in groups(rows).items()]
    panels = [(g, cells) for g, cells in panels if any(c[1] == "none" for c in cells) and len(cells) > 1]
    if not panels:
        return False
    columns = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / columns), columns, figsize=(5.5 * columns, 4.2 *
                             math.ceil(len(panels) / columns)), squeeze=False)
    for ax, (group, cells) in zip(axes.flat, panels):
        models = sorted({c[0] for c in cells})
        labels = list(dict.fromkeys((c[1], c[2]) for c in cell_order(cells) if c[1] != "none"))
        markers = dict(zip(models, "osD^v<>"))
        width = 0.8 / len(models)
        for j, model in enumerate(models):
            for i, (method, rule) in enumerate(labels):
                diffs = paired_differences(cells, (model, method, rule), "none")
                if not diffs:
                    continue
                x = i + (j - (len(models) - 1) / 2) * width
                color = plt.cm.tab10(i % 10)
                ax.scatter([x] * len(diffs), diffs, color=color, marker=markers[model], alpha=0.4, s=18)
                mean, std = mean_std(diffs)
                ax.errorbar(x, mean, yerr=std or 0, color=color, marker=markers[model], capsize=3, ms=7)
            ax.scatter([], [], color="gray", marker=markers[model], label=model)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(labels)), [m if r in ("-", DEFAULT_RULE) else f"{m}\n{r}" for m, r in labels],
                      fontsize=8)
        ax.set_ylabel("top-1 minus none's, same seed (points)")
        ax.set_title(f"{group[0]}: {group[1]}, {group[2]:,} images, {group[3]} ep.", fontsize=9)
        ax.legend(title="model (points: seeds)", fontsize=7, title_fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


SETUP = """\
Fashion-MNIST (60,000 train / 10,000 test, 28x28 grayscale upsampled to {img}x{img}), a random subset of the
training images per seed, the full test split for evaluation. Models from timm with random initialisation.
Every optimizer step of every method consumes {pair} samples: B = {batch} per task, task i and task j for MLTP,
two batches for standard training (`none`), one batch of {pair} taken twice for SAM (rho {rho}; the gradient at
w + e(w), BatchNorm statistics from the pass at w only; otherwise the same loop, clipping and optimizer). MLTP
at gamma {gamma} and its default inner-step rule `{rule}` unless the `alpha rule` column says otherwise; the
relative inner step is ||alpha P_S g_i|| / ||w_S||, and `inner / last update` its length over the optimizer's
last actual update of S, each the mean over the run. Top-1 is on the test split after the last epoch. Paired
differences subtract the `none` (or SAM) run of the same seed: same initialisation, subset and data order.
A difference counts as a gain or a loss when its mean exceeds the std of the paired differences over seeds.
With 3 seeds that is a weak test: for a method no better than `none` it flags 22 % of cells as a gain or a
loss (normal differences: Student's t with 2 degrees of freedom beyond sqrt 3). A consistent effect shows in
the pooled table below: every current setting's pairs of a method and model together, with an exact
sign-flip test. Wall time includes the evaluation after every epoch.
"""


def report(csv_path: Path, doc: Path) -> None:
    rows = numeric(read_rows(csv_path))
    if not rows:
        sys.exit(f"{csv_path} has no runs yet; run a setting's matrix first")
    png = doc.with_suffix(".png")
    by_group = groups(rows)
    sections, summary = [], []
    for setting in dict.fromkeys(g[0] for g in by_group):
        about = SETTINGS[setting].about if setting in SETTINGS else "A setting this script no longer defines."
        sections += [f"## Setting `{setting}`", "", about, ""]
        for group, runs in by_group.items():
            if group[0] != setting:
                continue
            verdict_lines = verdict(runs)
            summary.append(f"- `{setting}`, {group_title(group)}: {verdict_lines[0]}")
            sections += [f"### {group_title(group)}", ""] + main_table(runs) + [""]
            sections += verdict_lines + [""] + findings(runs) + [""]
            for (model, method, rule), grid in sensitivity_grids(runs).items():
                sections += [f"#### Sensitivity: {method} ({rule}) on {model}, final top-1", ""]
                sections += sensitivity_table(grid) + [""]
            if sensitivity_grids(runs):
                sections += sensitivity_findings(runs) + [""]
    lines = ["# Generalization: MLTP vs standard training vs SAM", "",
             f"Generated by `python benchmarks/generalization.py --report` from `{csv_path.name}` "
             f"({len(rows)} runs); every number below is computed from that file.", "",
             SETUP.format(img=IMG_SIZE, pair=2 * BATCH_SIZE, batch=BATCH_SIZE, rho=SAM_RHO, gamma=DEFAULT_GAMMA,
                          rule=DEFAULT_RULE), "## Verdicts", ""] + summary + [""]
    pooled = pooled_table(rows)
    if pooled:
        current = [name for name, setting in SETTINGS.items() if setting.pooled]
        lines += ["## Pooled over settings", "",
                  f"The paired differences of settings {', '.join(f'`{n}`' for n in current)} (every path, size and "
                  f"device), pooled per method and model; `better / worse` counts pairs. The p-value is the exact "
                  f"two-sided sign-flip test of the pooled pairs (no normality assumed).", ""]
        lines += pooled + [""] + pooled_findings(rows) + [""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    if plot(rows, png):
        lines += [f"![top-1 minus none's per seed, per setting]({png.name})", ""]
    doc.write_text("\n".join(lines + sections))
    print(f"wrote {doc}" + (f" and {png}" if png.is_file() else ""))


# ---- command line ---------------------------------------------------------------------------------

def csv_list(cast):
    return lambda text: tuple(cast(x) for x in text.split(",") if x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke matrix: underfit through both paths, none/fo/sam, 1 "
                                                        "tiny model, 1 seed, 256 samples of the shipped subset, 1 epoch")
    p.add_argument("--setting", choices=list(SETTINGS), help="the training regime whose matrix to run")
    p.add_argument("--matrix", choices=["main", "sensitivity", "all"], default="main",
                   help="main: methods x models x seeds (default); sensitivity: a gamma x alpha_scale grid")
    p.add_argument("--methods", type=csv_list(str), default=METHODS, help=f"default: {','.join(METHODS)} (fc only "
                                                                          f"where a model has more than a head)")
    p.add_argument("--models", type=csv_list(str), default=MODELS, help=f"default: {','.join(MODELS)}")
    p.add_argument("--seeds", type=csv_list(int), default=SEEDS, help=f"default: {','.join(map(str, SEEDS))}")
    p.add_argument("--paths", type=csv_list(str), default=None, help="engine and/or hf-trainer (default: the "
                                                                     "setting's)")
    p.add_argument("--alpha-rule", default=DEFAULT_RULE, choices=[r for r in ALPHA_RULES if r != "fixed"],
                   help="MLTP's inner-step rule (default: MLTPConfig's, %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override the setting's epochs")
    p.add_argument("--train-samples", type=csv_list(int), default=None, help="override the setting's training-set "
                                                                             "sizes (comma-separated)")
    p.add_argument("--csv", type=Path, default=None, help=f"results file (default: {RESULTS_CSV.relative_to(ROOT)}; "
                                                          f"with --quick: {QUICK_CSV.relative_to(ROOT)})")
    p.add_argument("--doc", type=Path, default=DOC, help="report file; the plot goes beside it as .png")
    p.add_argument("--report", action="store_true", help="only regenerate the doc and plot from the CSV")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default: %(default)s)")
    args = p.parse_args(argv)
    csv_path = args.csv or (QUICK_CSV if args.quick else RESULTS_CSV)
    if args.report:
        report(csv_path, args.doc)
        return
    setting = QUICK["setting"] if args.quick else args.setting
    if setting is None:
        p.error(f"choose a setting to run: --setting {'|'.join(SETTINGS)} (or --quick, or --report)")
    unknown = set(args.paths or ()) - set(PATHS)
    if unknown:
        p.error(f"--paths {','.join(sorted(unknown))}: the paths are {', '.join(PATHS)}")
    if "hf-trainer" in (args.paths or ()) and SETTINGS[setting].recipe:
        p.error(f"setting {setting!r} needs the engine's timm options ({', '.join(SETTINGS[setting].recipe)}), "
                f"which the hf-trainer path does not build; leave --paths at the setting's (engine)")
    missing = missing_options(setting)
    if missing:
        print(f"setting {setting!r} is unavailable: timm_mltp.engine.TrainArgs has no {', '.join(missing)} yet; "
              f"skipped")
        return
    if args.quick:
        # the shipped 10k/2k subset: no conversion, a short evaluation
        dataset, q = None, QUICK
        runs = plan(setting, "main", q["methods"], q["models"], q["seeds"], args.alpha_rule, epochs=q["epochs"],
                    train_samples=(q["train_samples"],))
    else:
        dataset = ensure_full_dataset()
        runs = plan(setting, args.matrix, args.methods, args.models, args.seeds, args.alpha_rule, args.paths,
                    args.epochs, args.train_samples)
    run_matrix(runs, csv_path, dataset, args.threads, args.jobs)


if __name__ == "__main__":
    main()
