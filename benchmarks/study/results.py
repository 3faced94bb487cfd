"""The study's CSV: one row per finished run, read in today's columns whatever layout wrote it."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from .settings import BASELINES, DEFAULT_CURVATURE_FRACTION


COLUMNS = ["device", "setting", "path", "method", "model", "seed", "epochs", "train_samples", "alpha_rule",
           "samples_seen", "optimizer_steps", "wall_seconds", "final_top1", "best_top1", "test_loss",
           "final_train_loss", "mean_grad_cosine", "mean_relative_step", "mean_update_ratio", "gamma", "alpha_scale",
           "batch_size", "lr", "mean_second_order_share", "curvature_fraction"]
TEXT_COLUMNS = ("device", "setting", "path", "method", "model", "alpha_rule")
KEY_TYPES = {"device": str, "setting": str, "path": str, "method": str, "model": str, "seed": int, "epochs": int,
             "train_samples": int, "alpha_rule": str, "gamma": float, "alpha_scale": float, "curvature_fraction": float}


def key(row: dict) -> tuple:
    return tuple(cast(row[k]) for k, cast in KEY_TYPES.items())


def upgraded(row: dict) -> dict:
    """A row in today's columns. Rows written before issue 11 lack setting, path and alpha_rule: every one
    of them was a `short` run through the engine, with alpha = lr (rule `lr`) for MLTP. Rows written before
    the study varied curvature_fraction took H_i v on all of task i: rho 1."""
    before = {"setting": "short", "path": "engine", "alpha_rule": "-" if row["method"] in BASELINES else "lr",
              "curvature_fraction": str(DEFAULT_CURVATURE_FRACTION)}
    out = {c: row[c] if row.get(c) is not None else before.get(c, "") for c in COLUMNS}
    if out["curvature_fraction"] == "":
        out["curvature_fraction"] = before["curvature_fraction"]
    return out


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
