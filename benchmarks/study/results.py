"""The study's CSV: one row per finished run, read in today's columns whatever layout wrote it; the code state
(commit, clean tree) each row records, and the rows no longer reproducible with the code as shipped."""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
from pathlib import Path

from .settings import BASELINES, DEFAULT_CURVATURE_FRACTION, SETTINGS


COLUMNS = ["device", "setting", "path", "method", "model", "seed", "epochs", "train_samples", "alpha_rule",
           "samples_seen", "optimizer_steps", "wall_seconds", "final_top1", "best_top1", "test_loss",
           "final_train_loss", "mean_grad_cosine", "mean_relative_step", "mean_update_ratio", "gamma", "alpha_scale",
           "batch_size", "lr", "mean_second_order_share", "curvature_fraction",
           "compute_of", "base_epochs", "cost_ratio",    # issue 24: the equal-compute baseline (settings.Run)
           "commit", "tree_clean"]                       # the code that made the row; "" in rows from before
TEXT_COLUMNS = ("device", "setting", "path", "method", "model", "alpha_rule", "compute_of", "commit", "tree_clean")
KEY_TYPES = {"device": str, "setting": str, "path": str, "method": str, "model": str, "seed": int, "epochs": int,
             "train_samples": int, "alpha_rule": str, "gamma": float, "alpha_scale": float, "curvature_fraction": float,
             "compute_of": str}


def key(row: dict) -> tuple:
    return tuple(cast(row[k]) for k, cast in KEY_TYPES.items())


def code_state(root: Path) -> tuple[str, str]:
    """(commit, tree clean: "yes" / "no") of the checkout at `root`, for every new row. STUDY_COMMIT and
    STUDY_TREE_CLEAN say it where they are set: a frozen copy of a commit, run inside another checkout (the
    device study: `git archive` of the commit, whose surrounding .git is not its own). Else git; where the tree
    is no git checkout, both are "" (unknown), as in rows from before issue 24. Exits where timm_mltp is not
    imported from `root` (an editable install of another checkout): the rows would record code that did not run."""
    package = Path(importlib.util.find_spec("timm_mltp").origin).resolve().parent
    if Path(root).resolve() not in package.parents:
        raise SystemExit(f"timm_mltp is imported from {package}, not from {root}: the rows would record {root}'s "
                         f"commit for other code; run with PYTHONPATH={root}")
    if os.environ.get("STUDY_COMMIT"):
        return os.environ["STUDY_COMMIT"], os.environ.get("STUDY_TREE_CLEAN", "")
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                                  timeout=30).stdout
        return git("rev-parse", "HEAD").strip(), "no" if git("status", "--porcelain").strip() else "yes"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("STUDY_COMMIT", ""), os.environ.get("STUDY_TREE_CLEAN", "")


# Code paths changed since some rows ran; those rows cannot be rerun and stay out of the pooled tables.
EARLIER_D = ("made with the earlier D = 1/(sqrt(v_hat) + eps); the shipped D = 1/sqrt(v_hat + eps^2) (commit "
             "9257200) gives other numbers in these chaotic short runs (issue 24)")
GONE_RULE = "its alpha rule is no longer in the code"
TIMED_AUTO = ("made while `auto` timed exact against fd on its first step (before commit fdb4952), so whether it ran "
              "exact or fd depended on the machine's load: the shipped auto runs exact and gives other numbers "
              "(issue 22; rerun sample in benchmarks/results/rerun_sample.md)")
SECOND_ORDER_METHODS = ("fc", "conv", "full")     # the MLTP variants with a second-order term: auto chose how
OLDER_ROUNDING = ("made before rows recorded their commit; the MLTP step has since changed how it rounds (w' in "
                  "fused calls, the cosine from norms: commits 07e4d20, 50460da), and sampled reruns of such `fo` "
                  "rows matched 1 of 4 (benchmarks/results/rerun_sample.md)")


def superseded(row: dict) -> str:
    """Why the code as shipped no longer makes this row ("" where it does, as far as is known). Under an adaptive
    optimizer the `preconditioned` and `online` rows from before rows recorded their commit were all run before
    commit 9257200 changed D (the `optimizer` rows there came after it, benchmarks/study_curvature.sh). Every
    second-order row from before rows recorded their commit ran under the timed `auto`; every row with a commit
    came after fdb4952 (the first commit recorded, 02a9fbe, descends from it). The other MLTP rows without a
    commit predate the step's new rounding; the baselines' old rows rerun to the last digit."""
    from timm_mltp.mltp import ALPHA_RULES   # here: the report reads CSVs without timm_mltp's import cost otherwise

    setting = SETTINGS.get(row["setting"])
    if row["alpha_rule"] not in ALPHA_RULES + ("-",):
        return GONE_RULE
    if (setting is not None and setting.opt != "sgd" and row["alpha_rule"] in ("preconditioned", "online")
            and not row.get("commit")):
        return EARLIER_D
    if row["method"] in SECOND_ORDER_METHODS and not row.get("commit"):
        return TIMED_AUTO
    if row["method"] not in BASELINES and not row.get("commit"):
        return OLDER_ROUNDING
    return ""


def upgraded(row: dict) -> dict:
    """A row in today's columns. Rows written before issue 11 lack setting, path and alpha_rule: every one
    of them was a `short` run through the engine, with alpha = lr (rule `lr`) for MLTP. Rows written before
    the study varied curvature_fraction took H_i v on all of task i: rho 1. Rows from before issue 24 are no
    equal-compute runs (their group is their own epochs) and their commit is unknown ("")."""
    before = {"setting": "short", "path": "engine", "alpha_rule": "-" if row["method"] in BASELINES else "lr",
              "curvature_fraction": str(DEFAULT_CURVATURE_FRACTION), "base_epochs": "0"}
    out = {c: row[c] if row.get(c) is not None else before.get(c, "") for c in COLUMNS}
    for column in ("curvature_fraction", "base_epochs"):
        if out[column] == "":
            out[column] = before[column]
    return out


def read_rows(path: Path) -> list[dict]:
    """The CSV's rows in today's columns; a last line cut short (a matrix killed while writing) is left out, and
    so is a row the code no longer makes where a rerun with the code as shipped has replaced it."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return unreplaced([upgraded(row) for row in rows if None not in row.values() and None not in row])


def unreplaced(rows: list[dict]) -> list[dict]:
    """`rows` less the superseded ones that have a current row of the same key (a matrix plans a superseded run
    again; the row it appends takes the old one's place)."""
    gone = [bool(superseded(row)) for row in rows]
    current = {key(row) for row, old in zip(rows, gone) if not old}
    return [row for row, old in zip(rows, gone) if not (old and key(row) in current)]


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
