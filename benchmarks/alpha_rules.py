"""Which inner-step rule is safe as the default? MLTPTrainer at Hugging Face's defaults (issue 11, item 2).

The setting where the old rule (`lr`: alpha = learning rate) lost 10-40 points: the HF Trainer with its
default gradient clipping (max_grad_norm 1.0), a timm ResNet from random init, timm's default training crop
(RandomResizedCrop scale 0.08-1, flip), 32x32, B = 32 per task, cosine schedule. Here: timm `test_resnet`
on the shipped Fashion-MNIST subset (10k train, 2k test), 5 epochs, under three optimizers:

    sgd           SGD lr 0.05, no momentum, clipping at 1.0
    sgdm          SGD lr 0.05, momentum 0.9, clipping at 1.0
    adamw         AdamW lr 1e-3 (HF's default optimizer), clipping at 1.0
    sgd-resnet18  as sgd, on timm resnet18 (11M parameters; one seed: ~4x the cost)

One JSON line per run in benchmarks/results/alpha_rules.jsonl (appended; finished runs are skipped):

    OMP_NUM_THREADS=1 python benchmarks/alpha_rules.py --jobs 2      # the matrix (~40 min of 2 CPU cores)
    python benchmarks/alpha_rules.py --report                        # the markdown table
    python benchmarks/alpha_rules.py --run sgd conv default 0 5 10000   # one run, printed
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "alpha_rules.jsonl"
SGD = dict(optim="sgd", learning_rate=0.05)
SETTINGS = {  # name: (model, optimizer); every one with HF's default clipping at norm 1.0
    "sgd": ("test_resnet", SGD),
    "sgdm": ("test_resnet", dict(SGD, optim_args="momentum=0.9")),
    "adamw": ("test_resnet", dict(optim="adamw_torch", learning_rate=1e-3)),
    "sgd-resnet18": ("resnet18", SGD),   # larger gradient norms (6 at init): clipping cuts more
}
METHODS = [("none", "default"), ("fo", "default"), ("conv", "default"), ("fo", "lr"), ("conv", "lr")]
SEEDS, EPOCHS, TRAIN_SAMPLES = (0, 1), 5, 10_000


def run(setting: str, method: str, rule: str, seed: int, epochs: int, n_train: int) -> dict:
    """One MLTPTrainer run; `rule` default: MLTPConfig's default alpha rule."""
    import numpy as np
    import timm
    import torch

    from timm_mltp import MLTPTrainer, MLTPTrainingArguments
    from timm_mltp.data import apply_transforms, collate_image_batch, create_transforms, load_image_dataset

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    name, optimizer = SETTINGS[setting]
    model = timm.create_model(name, num_classes=10, in_chans=1)
    ds = load_image_dataset()
    train_tf = create_transforms(model, img_size=32, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.0, in_chans=1)
    eval_tf = create_transforms(model, img_size=32, is_training=False, crop_pct=1.0, in_chans=1)
    train = apply_transforms(ds.train.shuffle(seed=0).select(range(n_train)), train_tf, ds.image_column,
                             ds.label_column, in_chans=1)
    test = apply_transforms(ds.eval, eval_tf, ds.image_column, ds.label_column, in_chans=1)
    mltp = dict(mltp_variant=method, **({} if rule == "default" else {"mltp_alpha_rule": rule}))
    args = MLTPTrainingArguments(
        output_dir=f"output/alpha_rules/{setting}-{method}-{rule}-{seed}", report_to="none", use_cpu=True,
        disable_tqdm=True, save_strategy="no", seed=seed, per_device_train_batch_size=32,
        per_device_eval_batch_size=200, num_train_epochs=epochs, lr_scheduler_type="cosine", logging_steps=50,
        dataloader_num_workers=0, **optimizer, **mltp)

    def accuracy(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = MLTPTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
                          data_collator=collate_image_batch)
    start = time.time()
    trainer.train()
    metrics = trainer.evaluate()
    logs = [log for log in trainer.state.log_history if "mltp_relative_step" in log]
    ratios = [log["mltp_update_ratio"] for log in logs if "mltp_update_ratio" in log]
    norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    return dict(setting=setting, method=method, rule=rule, seed=seed, acc=metrics["eval_accuracy"],
                secs=round(time.time() - start),
                rel_step=float(np.mean([log["mltp_relative_step"] for log in logs])) if logs else 0.0,
                update_ratio=float(np.mean(ratios)) if ratios else None, grad_norm=float(np.mean(norms)))


def read() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []


def matrix(jobs: int) -> None:
    done = {(r["setting"], r["method"], r["rule"], r["seed"]) for r in read()}
    todo = [(s, m, r, seed) for seed in SEEDS for s in SETTINGS for m, r in METHODS
            if (s, m, r, seed) not in done and (seed == SEEDS[0] or SETTINGS[s][0] == "test_resnet")]
    print(f"{len(todo)} runs to go, results in {RESULTS}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)

    def one(job):   # each run in its own process: one thread each, nothing shared
        cmd = [sys.executable, __file__, "--run", *map(str, job), str(EPOCHS), str(TRAIN_SAMPLES)]
        line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        with open(RESULTS, "a") as f:
            f.write(line + "\n")
        print(line)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def report() -> str:
    """Mean ± std over seeds, and the paired-by-seed difference to standard training (`none`)."""
    cells = defaultdict(dict)
    for r in read():
        cells[r["setting"], r["method"], r["rule"]][r["seed"]] = r
    lines = ["| setting (clip 1.0) | method | alpha rule | test top-1 | vs none, paired | relative inner step "
             "| inner step / last update | s per run |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for setting in SETTINGS:
        base = cells.get((setting, "none", "default"), {})
        for method, rule in METHODS:
            runs = cells.get((setting, method, rule), {})
            if not runs:
                continue
            acc = [100 * r["acc"] for r in runs.values()]
            diffs = [100 * (r["acc"] - base[s]["acc"]) for s, r in runs.items() if s in base]
            ratios = [r["update_ratio"] for r in runs.values() if r["update_ratio"] is not None]
            shown = "-" if method == "none" else ("optimizer (default)" if rule == "default" else rule)
            cols = [setting, method, shown, _mean_std(acc),
                    _mean_std(diffs, signed=True) if method != "none" and diffs else "-",
                    f"{statistics.fmean(r['rel_step'] for r in runs.values()):.1e}",
                    f"{statistics.fmean(ratios):.2f}" if ratios else "-",
                    f"{statistics.fmean(r['secs'] for r in runs.values()):.0f}"]
            lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float], signed: bool = False) -> str:
    mean = statistics.fmean(values)
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "") + f" (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=6, metavar=("OPT", "METHOD", "RULE", "SEED", "EPOCHS", "N_TRAIN"))
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    if args.run:
        setting, method, rule, seed, epochs, n = args.run
        print(json.dumps(run(setting, method, rule, int(seed), int(epochs), int(n))))
    elif args.report:
        print(report())
    else:
        matrix(args.jobs)


if __name__ == "__main__":
    main()
