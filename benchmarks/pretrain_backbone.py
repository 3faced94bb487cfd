"""The pretrained backbones of the study's `finetune` setting (issue 16), built once.

Fine-tuning needs a backbone that learned something the new task can use, and this project cannot download
one. So each model is trained here with standard training on Fashion-MNIST's classes 0-4 (all 30,000 training
images), and fine-tuned in the study on classes 5-9 with its classifier re-initialised:

    python benchmarks/pretrain_backbone.py --models test_convnext,test_vit    # ~3-8 min a model on one CPU thread

Deterministic (seed 0, one thread, no workers). The two class splits go to data/ (ignored by git) and the
backbones, without their classifier, to ~/.cache/timm-mltp/backbones/ ($TIMM_MLTP_CACHE overrides it): outside
git, rebuilt where missing. A file is written atomically, so a killed build is never taken for a finished one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402

from study.data import ensure_full_dataset  # noqa: E402  (benchmarks/study/, beside this file)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TIMM_MLTP_CACHE", Path.home() / ".cache" / "timm-mltp")) / "backbones"
SPLITS = {"0to4": range(0, 5), "5to9": range(5, 10)}
EPOCHS, LR, WEIGHT_DECAY, BATCH_SIZE, IMG_SIZE = 2, 2e-3, 0.05, 64, 32
MODEL_KWARGS = {"test_vit": {"patch_size": 4}}   # 32 px: 4-pixel patches, as in the study


def class_split(full: Path, name: str) -> Path:
    """Fashion-MNIST restricted to the classes of SPLITS[name], relabelled 0..4, saved beside the full set."""
    out = full.with_name(f"fashion-mnist-{name}")
    if (out / "dataset_dict.json").is_file():
        return out
    classes = list(SPLITS[name])
    dd = datasets.load_from_disk(str(full))
    label = next(c for c, f in dd["train"].features.items() if isinstance(f, datasets.ClassLabel))
    names = [dd["train"].features[label].names[c] for c in classes]
    features = dd["train"].features.copy()
    features[label] = datasets.ClassLabel(names=names)
    subset = dd.filter(lambda y: y in classes, input_columns=label).map(
        lambda y: {label: y - classes[0]}, input_columns=label, features=features)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subset.save_to_disk(str(partial))
    partial.rename(out)
    return out


def backbone_path(model: str) -> Path:
    return CACHE / f"{model}-fashion-mnist-0to4.pth"


def without_classifier(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights minus timm's classifier (pretrained_cfg['classifier']): a new task gets a new head."""
    classifier = model.pretrained_cfg.get("classifier", "head")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in names)}


def pretrain(model: str, full: Path) -> Path:
    """Standard training on classes 0-4 through the recipe's engine; the backbone's weights to the cache."""
    from timm_mltp.engine import TrainArgs, Trainer

    path = backbone_path(model)
    if path.is_file():
        return path
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="pretrain-") as output:
        args = TrainArgs(model=model, dataset=str(class_split(full, "0to4")), img_size=IMG_SIZE, batch_size=BATCH_SIZE,
                         epochs=EPOCHS, opt="adamw", lr=LR, weight_decay=WEIGHT_DECAY, warmup_epochs=1, clip_grad=1.0,
                         variant="none", seed=0, output=output, experiment=model, progress=False, workers=0,
                         model_kwargs=MODEL_KWARGS.get(model, {}))
        trainer = Trainer(args)
        result = trainer.fit()
        weights = without_classifier(trainer.module)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(weights, tmp)
    os.replace(tmp, path)
    top1 = result["rows"][-1].get("eval_top1")
    print(f"{model}: classes 0-4 top-1 {top1:.2f} after {EPOCHS} epochs -> {path}")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="test_convnext,test_vit")
    args = p.parse_args(argv)
    full = ensure_full_dataset()
    class_split(full, "5to9")
    for model in args.models.split(","):
        pretrain(model, full)


if __name__ == "__main__":
    main()
