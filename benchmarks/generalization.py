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
    converged    issue 24: resnet18, convnext_atto and vit_tiny at 32 px, 3,000 images x 30 epochs, 5 seeds,
                 SGD + momentum (`converged`) and AdamW (`converged-adamw`), on a GPU: benchmarks/device_study.sh
    converged-small  issue 24 on a 2-core CPU: resnet10t (SGD + momentum), convnext_atto and
                 mobilenetv3_small_100 (AdamW: `converged-small-adamw`), 2,000 images x 30 epochs, 5 seeds:
                 benchmarks/study_equal_compute.sh

Equal compute (issue 24): with --equal-compute fo,full,sam, each `none` run is joined by `none` runs given the
measured compute of those methods (epochs x the wall-time ratio of the paired runs), planned as soon as two
seeds of a method and `none` are in, so that one call fills both; --budget stops starting runs that would not
end in time, and the next call continues. Every new row records the commit and whether the tree was clean.

One row per finished run is appended to a CSV; runs already there are skipped, so a matrix can be filled over
several sessions, and `--report` turns the CSV into docs/generalization.md and .png.

    python benchmarks/generalization.py --setting underfit --jobs 2       # one setting's matrix, both cores
    python benchmarks/generalization.py --setting overfit --alpha-rule lr --jobs 2   # another inner-step rule
    python benchmarks/generalization.py --report                          # regenerate the doc and plot
    python benchmarks/generalization.py --quick --csv /tmp/q.csv          # smoke test, < 1 min
    python benchmarks/generalization.py --setting adamw --methods full --curvature-fraction 0.25   # H_i v on 1/4
    python benchmarks/generalization.py --setting overfit --equal-compute fo,conv,sam --jobs 2   # equal compute
    python benchmarks/generalization.py --setting converged,converged-adamw --methods none,fo,full,sam \
        --equal-compute fo,full,sam --jobs 12 --budget 450             # the GPU matrix (device_study.sh)
    python benchmarks/generalization.py --rerun-sample 3                # do 3 random rows still reproduce?
    python benchmarks/generalization.py --rerun-sample 2 --setting adamw --methods none,sam   # ... of these

Benchmark-only dependency: matplotlib (the plot).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from timm_mltp.mltp import ALPHA_RULES  # noqa: E402

# benchmarks/study/: one module a job (settings, sam, data, paths, results, matrix, report)
from study.data import ensure_full_dataset  # noqa: E402
from study.matrix import plan, run_matrix  # noqa: E402
from study.paths import missing_options  # noqa: E402
from study.report import report  # noqa: E402
from study.rerun import rerun_sample  # noqa: E402
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
    p.add_argument("--setting", type=csv_list(str), help=f"the training regime(s) whose matrix to run, comma-"
                                                         f"separated: {', '.join(SETTINGS)}")
    p.add_argument("--matrix", choices=["main", "sensitivity", "all"], default="main",
                   help="main: methods x models x seeds (default); sensitivity: a gamma x alpha_scale grid")
    p.add_argument("--methods", type=csv_list(str), default=METHODS, help=f"default: {','.join(METHODS)} (fc only "
                                                                          f"where a model has more than a head)")
    p.add_argument("--models", type=csv_list(str), default=None, help=f"default: the setting's ({','.join(MODELS)} "
                                                                      f"but for `converged`)")
    p.add_argument("--seeds", type=csv_list(int), default=None, help=f"default: the setting's "
                                                                     f"({','.join(map(str, SEEDS))} but for `converged`)")
    p.add_argument("--equal-compute", type=csv_list(str), default=(), metavar="METHODS",
                   help="also run `none` given the measured compute of each of these methods (issue 24)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no run that would not end within this many seconds from now (estimated from "
                        "finished runs); the next call continues")
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
    p.add_argument("--rerun-sample", type=int, default=None, metavar="N",
                   help="rerun N random rows of the CSV that this device can rerun and compare them to the last "
                        "digit (with --quick: rows of the quick matrix, on the shipped subset)")
    p.add_argument("--rerun-seed", type=int, default=0, help="which rows --rerun-sample draws (default: %(default)s)")
    args = p.parse_args(argv)
    if not 0 < args.curvature_fraction <= 1:
        p.error(f"--curvature-fraction must be in (0, 1], got {args.curvature_fraction}")
    csv_path = args.csv or (QUICK_CSV if args.quick else RESULTS_CSV)
    if args.report:
        report(csv_path, args.doc)
        return
    if args.rerun_sample is not None:
        # the quick matrix ran on the shipped subset; every other setting on the full Fashion-MNIST
        # --setting, --models, --methods and --paths narrow the rows drawn from (unset: any)
        within = {"setting": args.setting, "model": args.models, "path": args.paths,
                  "method": None if args.methods == METHODS else args.methods}
        matched = rerun_sample(csv_path, args.rerun_sample, None if args.quick else ensure_full_dataset(),
                               args.threads, args.rerun_seed, {k: v for k, v in within.items() if v})
        sys.exit(0 if matched else 1)
    settings = (QUICK["setting"],) if args.quick else args.setting
    if not settings:
        p.error(f"choose a setting to run: --setting {'|'.join(SETTINGS)} (or --quick, or --report)")
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        p.error(f"--setting {','.join(sorted(unknown))}: the settings are {', '.join(SETTINGS)}")
    unknown = set(args.paths or ()) - set(PATHS)
    if unknown:
        p.error(f"--paths {','.join(sorted(unknown))}: the paths are {', '.join(PATHS)}")
    unknown = set(args.equal_compute) - (set(METHODS) - {"none"})
    if unknown:
        p.error(f"--equal-compute {','.join(sorted(unknown))}: choose among {', '.join(METHODS[1:])}")
    runs = []
    for setting in settings:
        if "hf-trainer" in (args.paths or ()) and SETTINGS[setting].recipe:
            p.error(f"setting {setting!r} needs the engine's timm options ({', '.join(SETTINGS[setting].recipe)}), "
                    f"which the hf-trainer path does not build; leave --paths at the setting's (engine)")
        missing = missing_options(setting)
        if missing:
            print(f"setting {setting!r} is unavailable: timm_mltp.engine.TrainArgs has no {', '.join(missing)} "
                  f"yet; skipped")
            continue
        if args.quick:
            # the shipped 10k/2k subset: no conversion, a short evaluation
            q = QUICK
            runs += plan(setting, "main", q["methods"], q["models"], q["seeds"], args.alpha_rule, epochs=q["epochs"],
                         train_samples=(q["train_samples"],), curvature_fraction=args.curvature_fraction)
        else:
            s = SETTINGS[setting]
            runs += plan(setting, args.matrix, args.methods, args.models or s.models, args.seeds or s.seeds,
                         args.alpha_rule, args.paths, args.epochs, args.train_samples, args.curvature_fraction)
    if not runs:
        return
    dataset = None if args.quick else ensure_full_dataset()
    if run_matrix(runs, csv_path, dataset, args.threads, args.jobs, args.budget, args.equal_compute):
        sys.exit(1)   # some runs failed (printed); the others are in the CSV


if __name__ == "__main__":
    main()
