"""One run through either path, `engine` (timm_mltp.engine.Trainer, the recipe) or `hf-trainer` (MLTPTrainer
on a TimmWrapperForImageClassification), and its CSV row."""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from timm_mltp.data import apply_transforms, collate_image_batch, create_transforms, load_image_dataset
from timm_mltp.engine import TrainArgs, Trainer

from pretrain_backbone import MODEL_KWARGS, class_split, pretrain  # benchmarks/, beside this package

from .sam import SAMTrainer, hf_trainer_class
from .settings import BASELINES, HFLIP, IMG_SIZE, MODELS, SETTINGS, STUDY_MODEL_KWARGS, Run

MLTP_LOGGED = ("grad_cosine", "relative_step", "update_ratio", "second_order_share")


def run_data(run: Run, dataset: Path | None) -> tuple[Path | None, Path | None]:
    """The run's dataset and, for `finetune`, the pretrained backbone it starts from (built where missing)."""
    if SETTINGS[run.setting].data != "finetune" or dataset is None:
        return dataset, None
    return class_split(dataset, "5to9"), pretrain(run.model, dataset)


def model_kwargs(model: str) -> dict:
    """The model's build options in the study (4-pixel patches for the ViTs at 32 px)."""
    return MODEL_KWARGS.get(model, {}) | STUDY_MODEL_KWARGS.get(model, {})


def warmup_epochs(run: Run) -> int:
    """The setting's warmup; an equal-compute run stretches it with its epochs (the same schedule shape)."""
    warmup = SETTINGS[run.setting].warmup_epochs
    if not run.compute_of or not warmup:
        return warmup
    return round(warmup * run.epochs / run.base_epochs)


def train_options(run: Run, dataset: Path | None, output: str) -> dict:
    setting = SETTINGS[run.setting]
    dataset, backbone = run_data(run, dataset)
    optimizer = {} if setting.opt == "sgd" else {"opt": setting.opt, "warmup_epochs": warmup_epochs(run)}
    if setting.weight_decay is not None:
        optimizer["weight_decay"] = setting.weight_decay
    if backbone is not None:
        optimizer["pretrained_path"] = str(backbone)
    if not setting.eval_every_epoch:
        optimizer["val_interval"] = run.epochs
    if run.curvature_fraction != 1:   # rho = 1 (every earlier run): the options as they were, TrainArgs' default
        optimizer["curvature_fraction"] = run.curvature_fraction
    return dict(model=run.model, dataset=None if dataset is None else str(dataset), img_size=IMG_SIZE,
                max_train_samples=run.train_samples, scale=setting.scale, hflip=HFLIP, batch_size=setting.batch_size,
                epochs=run.epochs, lr=setting.lr, clip_grad=setting.clip_grad,
                variant="none" if run.method == "sam" else run.method, gamma=run.gamma, alpha_scale=run.alpha_scale,
                alpha_rule=None if run.method in BASELINES else run.alpha_rule, seed=run.seed, output=output,
                experiment=f"{run.model}-{run.method}-s{run.seed}", progress=False, workers=0,
                model_kwargs=model_kwargs(run.model), **optimizer, **setting.recipe)


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
    kwargs = model_kwargs(run.model)
    config = TimmWrapperConfig(architecture=run.model, num_labels=data.num_classes,
                               model_args=kwargs | ({"img_size": IMG_SIZE} if kwargs else {}))
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
    if run.curvature_fraction != 1:
        rule["mltp_curvature_fraction"] = run.curvature_fraction
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
