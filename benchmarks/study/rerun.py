"""Does the code as shipped still make the CSV's rows? Rerun a random sample and compare them to the last digit
the CSV keeps (issue 24). Only rows of this device can match: SPEC promises bit-equal runs on one machine and
software, not across CPU models or GPUs."""
from __future__ import annotations

import math
import random
from dataclasses import fields
from pathlib import Path

from .matrix import device_name
from .paths import execute
from .results import read_rows, superseded
from .settings import SETTINGS, Run

# what a run computes (wall time apart), as rounded in the CSV
COMPARED = ("optimizer_steps", "samples_seen", "final_top1", "best_top1", "test_loss", "final_train_loss",
            "mean_grad_cosine", "mean_relative_step", "mean_update_ratio", "mean_second_order_share")


def run_of(row: dict) -> Run:
    """The Run that made a CSV row (its key and the equal-compute fields)."""
    kinds = {"seed": int, "epochs": int, "train_samples": int, "base_epochs": int, "gamma": float,
             "alpha_scale": float, "curvature_fraction": float}
    values = {}
    for f in fields(Run):
        text = row[f.name]
        if f.name == "cost_ratio":
            values[f.name] = float(text) if text not in ("", None) else None
        else:
            values[f.name] = kinds.get(f.name, str)(text)
    return Run(**values)


def same(old: str, new) -> bool:
    """Equal as the CSV writes them: "87.0" and 87.0 match; two empty cells match; nan matches nan."""
    if old == "" or new in ("", None):
        return old == "" and new in ("", None)
    a, b = float(old), float(new)
    return a == b or (math.isnan(a) and math.isnan(b))


def why_not(row: dict, device: str) -> str:
    """Why a row cannot be rerun here ("" if it can)."""
    if row["setting"] not in SETTINGS:
        return "its setting is no longer defined"
    reason = superseded(row)
    if reason:
        return reason
    if row["device"] != device:
        return f"made on {row['device']!r}, this is {device!r}"
    return ""


def rerun_sample(csv_path: Path, n: int, dataset: Path | None, threads: int, seed: int = 0,
                 within: dict | None = None) -> bool:
    """Rerun n rows drawn (with `seed`) from those this device can rerun, print each compared column, and say
    which rows cannot be rerun and why. within: column -> allowed values, the rows to draw from (all if None).
    True when every rerun row matches."""
    rows, device = read_rows(csv_path), device_name(threads)
    rows = [row for row in rows if all(row[column] in allowed for column, allowed in (within or {}).items())]
    blocked = [(row, why_not(row, device)) for row in rows]
    candidates = [row for row, reason in blocked if not reason]
    print(f"{len(rows)} rows in {csv_path}; {len(candidates)} can be rerun here ({device})")
    reasons: dict[str, int] = {}
    for _, reason in blocked:
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        print(f"- cannot be rerun: {count} row(s) {reason}")
    sample = random.Random(seed).sample(candidates, min(n, len(candidates)))
    matched = 0
    for row in sample:
        new = execute(run_of(row), dataset, device, threads)
        differ = [c for c in COMPARED if not same(row[c], new.get(c))]
        name = (f"{row['setting']} {row['path']} {row['model']} {row['method']} ({row['alpha_rule']}) seed "
                f"{row['seed']}" + (f", compute of {row['compute_of']}" if row["compute_of"] else "")
                + f" [commit {row['commit'][:8] or 'unknown'}]")
        if differ:
            print(f"DIFFERS: {name}: " + "; ".join(f"{c} {row[c]} -> {new.get(c)}" for c in differ))
        else:
            matched += 1
            print(f"matches to the last digit: {name}: top-1 {row['final_top1']}, test loss {row['test_loss']}")
    print(f"{matched} of {len(sample)} rerun row(s) match to the last digit")
    return matched == len(sample)
