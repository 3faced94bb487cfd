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
    python benchmarks/generalization.py --setting adamw --methods full --curvature-fraction 0.25   # H_i v on 1/4

Benchmark-only dependency: matplotlib (the plot).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from timm_mltp.mltp import ALPHA_RULES  # noqa: E402

# benchmarks/study/: one module a job (settings, sam, data, paths, results, matrix, report)
from study.data import ensure_full_dataset  # noqa: E402
from study.matrix import plan, run_matrix  # noqa: E402
from study.paths import missing_options  # noqa: E402
from study.report import report  # noqa: E402
from study.settings import (  # noqa: E402
    DEFAULT_CURVATURE_FRACTION, DEFAULT_RULE, METHODS, MODELS, PATHS, QUICK, SEEDS, SETTINGS)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_CSV = ROOT / "benchmarks" / "results" / "generalization.csv"
QUICK_CSV = ROOT / "output" / "generalization-quick.csv"
DOC = ROOT / "docs" / "generalization.md"


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
    p.add_argument("--curvature-fraction", type=float, default=DEFAULT_CURVATURE_FRACTION, metavar="RHO",
                   help="MLTP's curvature_fraction: H_i v on this random share of task i, in (0, 1] (default "
                        "%(default)s: all of it); none and sam always run at 1")
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
    if not 0 < args.curvature_fraction <= 1:
        p.error(f"--curvature-fraction must be in (0, 1], got {args.curvature_fraction}")
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
                    train_samples=(q["train_samples"],), curvature_fraction=args.curvature_fraction)
    else:
        dataset = ensure_full_dataset()
        runs = plan(setting, args.matrix, args.methods, args.models, args.seeds, args.alpha_rule, args.paths,
                    args.epochs, args.train_samples, args.curvature_fraction)
    run_matrix(runs, csv_path, dataset, args.threads, args.jobs)


if __name__ == "__main__":
    main()
