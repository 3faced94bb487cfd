"""benchmarks/generalization.py and its package benchmarks/study/: the quick underfit matrix runs through both
paths (engine and MLTPTrainer) and a rerun skips it, an old-format CSV is read and upgraded, the report turns a CSV
into the doc (verdicts per setting) and the plot, a setting the engine cannot run yet is skipped, and the SAM step
is SAM's. Issue 24: the equal-compute epochs by hand from a cost ratio, their planning from the CSV, both
comparisons in the report with the verdict at equal compute, the commit with every row, and the rerun tool on a
tiny row."""
import copy
import csv
import os
import subprocess
import sys
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest
import torch

from timm_mltp.passes import frozen_running_stats

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "generalization.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
sys.path.insert(0, str(ROOT / "benchmarks"))   # the study package and the scripts, as `python benchmarks/...` sees them

import generalization  # noqa: E402
from study import paths  # noqa: E402
from study.matrix import plan  # noqa: E402
from study.report import SIGN_FLIP_DRAWS, report, sign_flip_p  # noqa: E402
from study.results import (COLUMNS, EARLIER_D, GONE_RULE, OLDER_ROUNDING, TIMED_AUTO, append_row,  # noqa: E402
                           code_state, key, read_rows, superseded)
from study.sam import SAMTrainer  # noqa: E402
from study.settings import (ALPHA_SCALES, BASELINES, BATCH_SIZE, DEFAULT_RULE, GAMMAS, METHODS, MODELS,  # noqa: E402
                            OVERFIT_EPOCHS, PATHS, QUICK, SAM_RHO, SEEDS, SETTINGS, Run)


def bench(*args):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_underfit_runs_both_paths_and_a_rerun_skips_them(tmp_path):
    results = tmp_path / "quick.csv"
    bench("--quick", "--csv", str(results))
    rows = read_csv(results)
    assert list(rows[0]) == COLUMNS
    assert sorted((r["path"], r["method"]) for r in rows) == sorted(
        (path, method) for path in PATHS for method in QUICK["methods"])
    by = {(r["path"], r["method"]): r for r in rows}
    for row in rows:
        assert row["setting"] == "underfit"
        assert row["alpha_rule"] == ("-" if row["method"] in BASELINES else DEFAULT_RULE)
        steps = int(row["optimizer_steps"])
        assert steps == QUICK["train_samples"] // (2 * BATCH_SIZE)
        assert int(row["samples_seen"]) == steps * 2 * BATCH_SIZE   # the same 2B per step for every method
        assert 0 <= float(row["final_top1"]) <= float(row["best_top1"]) <= 100
    for path in PATHS:
        assert by[path, "sam"]["mean_grad_cosine"] == by[path, "sam"]["mean_relative_step"] == ""
        assert float(by[path, "none"]["mean_relative_step"]) == 0.0 and by[path, "none"]["mean_update_ratio"] == ""
        assert 0 < float(by[path, "fo"]["mean_relative_step"]) < 1     # MLTP's inner step, logged by either path
        assert float(by[path, "fo"]["mean_update_ratio"]) > 0
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert {(r["commit"], r["tree_clean"] in ("yes", "no")) for r in rows} == {(commit.strip(), True)}
    before = results.read_text()
    out = bench("--quick", "--csv", str(results))
    assert f"{len(rows)} already in" in out and "0 to go" in out
    assert results.read_text() == before

    # the rerun tool on tiny rows: the engine's fo row as written, its none row with a top-1 one digit off, a row
    # of the earlier D under AdamW and one of another device: two reruns, one match, one difference, two refusals
    sample = tmp_path / "sample.csv"
    append_row(sample, by["engine", "fo"])
    append_row(sample, {**by["engine", "none"], "final_top1": f"{float(by['engine', 'none']['final_top1']) + 0.01:.3f}"})
    append_row(sample, {**by["engine", "fo"], "setting": "adamw", "alpha_rule": "preconditioned", "commit": ""})
    append_row(sample, {**by["engine", "sam"], "device": "another machine"})
    result = subprocess.run([sys.executable, str(SCRIPT), "--rerun-sample", "10", "--quick", "--csv", str(sample)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]      # not every row matched
    out = result.stdout
    assert "4 rows in" in out and "2 can be rerun here" in out
    assert "cannot be rerun: 1 row(s) made with the earlier D" in out and "made on 'another machine'" in out
    assert f"matches to the last digit: underfit engine test_convnext fo ({DEFAULT_RULE}) seed 0" in out
    assert "DIFFERS: underfit engine test_convnext none (-) seed 0" in out and "final_top1" in out.split("DIFFERS")[1]
    assert "1 of 2 rerun row(s) match to the last digit" in out
    # --methods narrows the draw: the two fo rows, of which this device can rerun one, which matches
    result = subprocess.run([sys.executable, str(SCRIPT), "--rerun-sample", "10", "--quick", "--csv", str(sample),
                             "--methods", "fo"], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rows in" in result.stdout and "1 can be rerun here" in result.stdout
    assert "1 of 1 rerun row(s) match to the last digit" in result.stdout


OLD_COLUMNS = ["device", "method", "model", "seed", "epochs", "train_samples", "samples_seen", "optimizer_steps",
               "wall_seconds", "final_top1", "best_top1", "test_loss", "final_train_loss", "mean_grad_cosine",
               "gamma", "alpha_scale", "batch_size", "lr"]


def old_row(method, seed=0, top1=87.0):
    return {"device": "cpu old", "method": method, "model": "test_resnet", "seed": seed, "epochs": 4,
            "train_samples": 20000, "samples_seen": 79872, "optimizer_steps": 624, "wall_seconds": 190.0,
            "final_top1": top1, "best_top1": top1, "test_loss": 0.35, "final_train_loss": 0.38,
            "mean_grad_cosine": "" if method == "sam" else 0.05, "gamma": 0.5, "alpha_scale": 1.0, "batch_size": 64,
            "lr": 0.05}


def test_an_old_format_csv_is_read_as_the_short_setting_and_upgraded_on_append(tmp_path):
    results = tmp_path / "old.csv"
    with open(results, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=OLD_COLUMNS)
        writer.writeheader()
        writer.writerows([old_row("none"), old_row("fo"), old_row("sam")])
    rows = read_rows(results)
    assert [(r["setting"], r["path"], r["alpha_rule"]) for r in rows] == [
        ("short", "engine", "-"), ("short", "engine", "lr"), ("short", "engine", "-")]
    assert rows[1]["mean_relative_step"] == "" and rows[1]["final_top1"] == "87.0"
    # the old runs are the `short` matrix at rule lr: rerunning it skips them
    planned = plan("short", "main", ("none", "fo", "sam"), ("test_resnet",), (0,), "lr")
    assert {key({"device": "cpu old", **asdict(r)}) for r in planned} == {key(r) for r in rows}

    new = {**rows[0], "setting": "overfit", "train_samples": 2000, "mean_relative_step": 0.001}
    append_row(results, new)
    upgraded = read_csv(results)
    assert list(upgraded[0]) == COLUMNS
    assert upgraded[:3] == rows                       # the old rows kept, in today's columns
    assert upgraded[3]["setting"] == "overfit" and upgraded[3]["mean_relative_step"] == "0.001"


def test_a_row_without_curvature_fraction_reads_as_rho_1_and_the_key_differs_by_rho(tmp_path):
    results = tmp_path / "before-rho.csv"
    before = [c for c in COLUMNS if c != "curvature_fraction"]   # the layout before the study varied rho
    run = Run("adamw", "engine", "full", "test_convnext", 0, 5, 2000, DEFAULT_RULE)
    row = {**{c: "" for c in before}, **asdict(run), "device": "cpu test", "final_top1": 60.0}
    del row["curvature_fraction"]
    with open(results, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=before)
        writer.writeheader()
        writer.writerow(row)
    (read,) = read_rows(results)
    assert float(read["curvature_fraction"]) == 1.0
    # the run planned at rho 1 is that row (skipped); at rho 1/4 it is another run; baselines stay at rho 1
    at = {rho: plan("adamw", "main", ("none", "sam", "full"), ("test_convnext",), (0,), DEFAULT_RULE,
                    paths=("engine",), curvature_fraction=rho) for rho in (1.0, 0.25)}
    keys = {rho: {r.method: key({"device": "cpu test", **asdict(r)}) for r in runs} for rho, runs in at.items()}
    assert keys[1.0]["full"] == key(read) != keys[0.25]["full"]
    assert {r.method: r.curvature_fraction for r in at[0.25]} == {"none": 1.0, "sam": 1.0, "full": 0.25}
    assert keys[1.0]["none"] == keys[0.25]["none"] and keys[1.0]["sam"] == keys[0.25]["sam"]
    # rho reaches the engine's TrainArgs; at rho 1 the options are what they were before
    options = {rho: paths.train_options(next(r for r in runs if r.method == "full"), None, "")
               for rho, runs in at.items()}
    assert "curvature_fraction" not in options[1.0] and options[0.25]["curvature_fraction"] == 0.25
    assert paths.train_args(at[0.25][-1], None, str(tmp_path)).curvature_fraction == 0.25
    # appending rewrites the file in today's columns, the old row at rho 1
    append_row(results, {**read, "seed": 1, "curvature_fraction": 0.25})
    rewritten = read_csv(results)
    assert list(rewritten[0]) == COLUMNS and [float(r["curvature_fraction"]) for r in rewritten] == [1.0, 0.25]


def test_plan_covers_a_settings_paths_sizes_and_fc_only_beyond_the_head():
    underfit = plan("underfit", "main", METHODS, MODELS, SEEDS, DEFAULT_RULE)
    assert {r.path for r in underfit} == set(PATHS) and SETTINGS["underfit"].clip_grad == 1.0
    fc_models = {r.model for r in underfit if r.method == "fc"}
    assert fc_models == {"test_convnext"}             # test_resnet's only linear module is its classifier
    per_path = (len(METHODS) * len(MODELS) - 1) * len(SEEDS)
    assert len(underfit) == 2 * per_path
    assert {r.alpha_rule for r in underfit if r.method in BASELINES} == {"-"}
    overfit = plan("overfit", "main", ("none", "sam"), MODELS, (0,), "clip")
    assert sorted({r.train_samples for r in overfit}) == [2000]
    assert {(r.path, r.epochs) for r in overfit} == {("engine", OVERFIT_EPOCHS)}


def test_a_setting_the_engine_cannot_run_yet_is_skipped(tmp_path, monkeypatch, capsys):

    @dataclass
    class OlderTrainArgs:   # a TrainArgs before timm's regularisers
        model: str = "resnet18"
        smoothing: float = 0.0

    monkeypatch.setattr(paths, "TrainArgs", OlderTrainArgs)
    assert {"aa", "reprob", "mixup", "cutmix", "model_ema"} <= set(paths.missing_options("timm-recipe"))
    results = tmp_path / "r.csv"
    generalization.main(["--setting", "timm-recipe", "--csv", str(results)])
    assert "setting 'timm-recipe' is unavailable" in capsys.readouterr().out
    assert not results.exists()


def synthetic_rows():
    """underfit: fo gains 1 point on every seed, conv ties; overfit: fo loses 2 points; timm-recipe: two
    seeds only; overfit-v1: fo gains 5 (an earlier setting, not pooled); short: the old rows of issue 5, with a
    sensitivity grid."""
    rows = []

    def add(setting, method, seed, top1, model="net_a", path="engine", seconds=10.0, step=1e-3, **kw):
        rule = "-" if method in BASELINES else kw.pop("rule", DEFAULT_RULE)
        rows.append({"device": "cpu test", "setting": setting, "path": path, "method": method, "model": model,
                     "seed": seed, "epochs": 2, "train_samples": kw.pop("n", 1000), "alpha_rule": rule,
                     "samples_seen": 1920, "optimizer_steps": 15, "wall_seconds": seconds, "final_top1": top1,
                     "best_top1": top1 + 0.5, "test_loss": 0.5, "final_train_loss": 0.4,
                     "mean_grad_cosine": "" if method == "sam" else 0.3,
                     "mean_relative_step": "" if method == "sam" else (0.0 if method == "none" else step),
                     "mean_update_ratio": "" if method in BASELINES else 0.6, "gamma": kw.pop("gamma", 0.5),
                     "alpha_scale": kw.pop("alpha_scale", 1.0), "batch_size": 64, "lr": 0.05,
                     "commit": kw.pop("commit", "abc")})

    wobble, noise = (0.0, 0.2, -0.2), (0.0, 0.4, -0.3)   # seed-to-seed changes of a gain
    for model in ("net_a", "net_b"):
        for seed in range(3):
            base = 80 + seed
            add("underfit", "none", seed, base, model)
            add("underfit", "fo", seed, base + 1.0 + wobble[seed], model)
            add("underfit", "conv", seed, base + noise[seed], model, seconds=15.0, commit="")   # timed auto
            add("underfit", "sam", seed, base + 0.2 * (seed - 1), model, seconds=20.0)
            add("overfit", "none", seed, base, model)
            add("overfit", "fo", seed, base - 2.0 + wobble[seed], model)
            add("overfit", "sam", seed, base + 0.5 * (seed - 1), model)
    for seed in range(2):
        add("timm-recipe", "none", seed, 85.0 + seed)
        add("timm-recipe", "fo", seed, 85.5 + seed)
    for seed in range(3):
        add("overfit-v1", "none", seed, 70.0 + seed)      # an earlier version: kept, but never pooled
        add("overfit-v1", "fo", seed, 75.0 + seed)
        add("short", "none", seed, 87.0 + seed)
        add("short", "full", seed, 87.2 + seed, rule="lr")
    for seed in range(3):   # under AdamW: the preconditioned rule gains 0.5, the old default (update) loses 3
        add("adamw", "none", seed, 50.0 + seed, path="hf-trainer")
        add("adamw", "fo", seed, 50.5 + seed, path="hf-trainer", rule="preconditioned", commit="abc")
        add("adamw", "fo", seed, 47.0 + seed, path="hf-trainer", rule="update")
        # the earlier D (no commit recorded): shown in its group, never pooled (else net_a's preconditioned fo
        # would pool 6 pairs)
        add("finetune", "none", seed, 60.0 + seed)
        add("finetune", "fo", seed, 70.0 + seed, rule="preconditioned", commit="")
    for gamma in GAMMAS:
        for scale in ALPHA_SCALES:
            if (gamma, scale) != (0.5, 1.0):
                add("short", "full", 0, 86 + gamma + scale, rule="lr", gamma=gamma, alpha_scale=scale)
    return rows


def test_report_writes_verdicts_per_setting_the_doc_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    results, doc = tmp_path / "results.csv", tmp_path / "docs" / "generalization.md"
    for row in synthetic_rows():
        append_row(results, row)
    bench("--report", "--csv", str(results), "--doc", str(doc))
    text = doc.read_text()
    for setting in ("underfit", "overfit", "timm-recipe", "short"):
        assert f"## Setting `{setting}`" in text
    sections = {part.split("\n", 1)[0]: part for part in text.split("## Setting ")[1:]}
    underfit, overfit = sections["`underfit`"], sections["`overfit`"]
    recipe, short = sections["`timm-recipe`"], sections["`short`"]
    # the table: mean ± std, paired differences to none and to SAM, relative inner step, cost
    assert "| net_a | fo | optimizer | 82.00 ± 0.92 (n=3) |" in underfit
    assert "| 1.00 ± 0.20 (n=3) | - | 1.00 ± 0.35 (n=3) | 1.0e-03 ± 0.0e+00 (n=3) | 0.60 ± 0.00 (n=3) | " \
        "0.300 ± 0.000 (n=3) | - | 1.00x (10 s) |" in underfit
    assert "| net_a | sam | - |" in underfit and "2.00x (20 s)" in underfit
    # the verdicts a user acts on
    assert "**MLTP helps here**: fo (optimizer) on net_a (+1.00 ± 0.20 vs none, +1.00 ± 0.35 vs SAM, 1.00x the " \
           "time); fo (optimizer) on net_b (" in underfit
    assert "Of these, fo (optimizer) on net_a, fo (optimizer) on net_b also beat SAM." in underfit
    assert "conv (optimizer) on net_a: +0.03 ± 0.35 points vs `none` over 3 paired seed(s), within the " \
           "seed-to-seed std" in underfit
    assert "**MLTP does not help here**: no MLTP variant beats standard training (`none`)" in overfit
    assert "- Worse than standard training: fo (optimizer) on net_a (-2.00 ± 0.20 vs none" in overfit
    assert "- The default rule `optimizer` loses more than the seed-to-seed std of standard training: " \
           "fo (optimizer) on net_a (-2.00, std of none 1.00)" in overfit
    assert "- The default rule `optimizer` loses no more than the seed-to-seed std" in underfit
    assert "**Not enough runs** for a verdict: 3 seeds per cell are needed; seeds so far: none on net_a (2), " \
           "fo (optimizer) on net_a (2)." in recipe
    assert "**MLTP helps here**: full (lr) on net_a (+0.20 ± 0.00 vs none, 1.00x the time) beats standard " \
           "training by more than the seed-to-seed spread of the paired differences. SAM was not run here." in short
    # the old setting keeps its section, sensitivity grid included
    assert "#### Sensitivity: full (lr) on net_a, final top-1" in short and "| full | lr |" in short
    # the summary at the top: one verdict per group
    summary = text.split("## Verdicts", 1)[1].split("## Setting", 1)[0]
    assert summary.count("\n- `") == 7 and "- `overfit`, engine, 1,000 training images" in summary
    # pooled over the current settings (not `short`): net_a's fo has 3 + 3 + 2 pairs, 5 better and 3 worse
    pooled = text.split("## Pooled over settings", 1)[1].split("## Setting", 1)[0]
    assert "settings `underfit`, `overfit`, `timm-recipe`, `adamw`, `finetune`, `converged`, `converged-adamw`, `converged-small`, `converged-small-adamw` (" in pooled
    assert "| net_a | fo | optimizer | 8 | -0.25 ± 1.47 (n=8) | 5 / 3 |" in pooled
    assert "| net_b | sam | - | 6 | 0.00 ± 0.34 (n=6) | 2 / 2 | 1.000 | - | - |" in pooled
    assert "full" not in pooled
    # second-order rows without a commit ran under the timed auto: shown with their mark, never pooled
    assert ("- Not reproducible with the code as shipped (left out of the pooled tables): conv (optimizer) on "
            "net_a, seeds 0, 1, 2: made while `auto` timed exact against fd") in underfit
    assert "| conv |" not in pooled
    assert "| net_a | fo | preconditioned | 3 | 0.50 ± 0.00 (n=3) | 3 / 0 |" in pooled
    finetune = sections["`finetune`"]
    assert ("- Not reproducible with the code as shipped (left out of the pooled tables): fo (preconditioned) on "
            "net_a, seeds 0, 1, 2: made with the earlier D") in finetune
    assert "- 3 row(s) made with the earlier D" in text
    assert "| net_a | fo | update | 3 | -3.00 ± 0.00 (n=3) | 0 / 3 |" in pooled
    # per optimizer family, the default only: the recipe's SGD + momentum settings, AdamW's preconditioned rows
    family = text.split("## The default per optimizer family", 1)[1].split("## Setting", 1)[0]
    assert "| SGD + momentum | net_a | fo | 8 | -0.25 ± 1.47 (n=8) | 5 / 3 |" in family
    assert "| adaptive (AdamW) | net_a | fo | 3 | 0.50 ± 0.00 (n=3) | 3 / 0 | 0.250 |" in family
    assert "fo on net_a in `overfit` engine (-2.00 over 3 seeds, std of none 1.00)" in family
    assert "update" not in family.split("|", 1)[1]
    assert doc.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_the_shipped_code_no_longer_makes_are_named_with_why():
    row = {"setting": "underfit", "method": "conv", "alpha_rule": "optimizer", "commit": ""}
    assert superseded(row) == TIMED_AUTO                         # exact or fd: load decided
    assert superseded(row | {"commit": "abc"}) == ""             # after fdb4952: auto runs exact
    assert superseded(row | {"method": "full"}) == superseded(row | {"method": "fc"}) == TIMED_AUTO
    assert superseded(row | {"method": "fo"}) == OLDER_ROUNDING
    assert superseded(row | {"method": "fo", "commit": "abc"}) == ""
    assert superseded(row | {"method": "sam", "alpha_rule": "-"}) == superseded(row | {"method": "none"}) == ""
    adamw = row | {"setting": "adamw", "method": "fo", "alpha_rule": "preconditioned"}
    assert superseded(adamw) == EARLIER_D and superseded(adamw | {"commit": "abc"}) == ""
    assert superseded(adamw | {"method": "full"}) == EARLIER_D   # the first reason found
    assert superseded(row | {"alpha_rule": "optimizer-v0"}) == GONE_RULE


def test_a_row_the_code_no_longer_makes_is_run_again_and_replaced(tmp_path, monkeypatch):
    from study import matrix
    results, device = tmp_path / "results.csv", matrix.device_name(1)
    base = plan("converged", "main", ("none", "full"), ("resnet18",), (0,), DEFAULT_RULE)
    for run in base:     # no commit: `none` as shipped, `full` under the timed auto
        append_row(results, csv_row(run.method, 0, 10.0, 70.0) | {"device": device, "commit": ""})
    ran = []

    def execute(job):
        ran.append(job[0])
        return {c: "" for c in COLUMNS} | asdict(job[0]) | {"device": device, "wall_seconds": 12.0,
                                                             "final_top1": 71.0}
    monkeypatch.setattr(matrix, "_execute", execute)
    assert matrix.run_matrix(base, results, None, threads=1, jobs=1) == 0
    assert [run.method for run in ran] == ["full"]
    assert sorted((r["method"], r["final_top1"], bool(r["commit"])) for r in read_rows(results)) == [
        ("full", "71.0", True), ("none", "70.0", False)]
    assert len(results.read_text().splitlines()) == 1 + 3        # the old row stays in the file, read no more
    assert matrix.run_matrix(base, results, None, threads=1, jobs=1) == 0 and len(ran) == 1


def test_sign_flip_p_counts_the_sign_patterns_at_least_as_extreme_by_hand():
    # all 8 patterns of (1, 2, 3): sums 6, 4, 2, 0, 0, -2, -4, -6
    assert sign_flip_p([1.0, 2.0, 3.0]) == 2 / 8          # |sum| >= 6: the pattern and its mirror
    assert sign_flip_p([1.0, -2.0, 3.0]) == 6 / 8         # |sum| >= 2: all but the two zeros
    assert sign_flip_p([0.5] * 5) == 2 / 32               # five gains: the best 5 seeds can show
    assert sign_flip_p([0.1, 0.2, 0.3 - 0.6]) == 1.0      # sum 0 up to rounding: every pattern ties or beats it
    # beyond 16 pairs, random patterns: all 30 gains (exact p 2^-29) is as extreme as 1 + the draws allow;
    # a zero sum still has p 1
    assert sign_flip_p([0.5] * 30) == pytest.approx(1 / (1 + SIGN_FLIP_DRAWS), abs=1e-5)
    assert sign_flip_p([1.0, -1.0] * 15) == 1.0


def test_sam_step_is_sgd_with_the_gradient_at_the_perturbed_weights(tmp_path):
    run = Run("underfit", "engine", "sam", "test_resnet", seed=0, epochs=1, train_samples=256, alpha_rule="-")
    trainer = SAMTrainer(paths.train_args(run, None, str(tmp_path)))
    batch = next(iter(trainer.train_loader))
    model = trainer.module.train()
    # the reference: SAM written out (Foret et al. 2021, Algorithm 1) on a copy, then the engine's SGD settings
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    loss = lambda: torch.nn.functional.cross_entropy(ref(batch["pixel_values"]), batch["labels"])  # noqa: E731
    grads = torch.autograd.grad(loss(), params)
    norm = torch.stack([x.norm() for x in grads]).norm() + 1e-12
    with torch.no_grad():
        for p, grad in zip(params, grads):
            p.add_(grad, alpha=SAM_RHO / norm.item())          # w + e(w)
    with frozen_running_stats(ref):
        grads_at_e = torch.autograd.grad(loss(), params)
    with torch.no_grad():
        for p, grad in zip(params, grads):
            p.sub_(grad, alpha=SAM_RHO / norm.item())          # back to w
    for p, grad in zip(params, grads_at_e):
        p.grad = grad
    # the setting clips the gradient at norm 1 before the step, as the engine does
    torch.nn.utils.clip_grad_norm_(params, SETTINGS["underfit"].clip_grad)
    position = {id(p): i for i, p in enumerate(model.parameters())}
    settings = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
    torch.optim.SGD([{"params": [params[position[id(p)]] for p in group["params"]],
                      **{k: group.get(k, 0.0) for k in settings}} for group in trainer.optimizer.param_groups]).step()

    stats = trainer.train_step(batch)
    assert stats is not None and trainer.num_updates == 1
    for (name, p), expected in zip(model.named_parameters(), params):
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=1e-4, msg=name)
    for (name, b), expected in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, expected, msg=name)


def test_runs_at_rho_below_1_enter_only_the_curvature_section(tmp_path):
    pytest.importorskip("matplotlib")
    rows = synthetic_rows()
    plain, sampled = tmp_path / "plain.csv", tmp_path / "sampled.csv"
    for row in rows:
        append_row(plain, row)
        append_row(sampled, row)
    # underfit's fo on net_a at rho 1/4: +0.5, -0.25, +1.0 against rho 1 on seeds 0-2, 12 s a run (rho 1: 10 s);
    # conv at rho 1/4 on seed 5, which rho 1 lacks: no pair
    fo = {r["seed"]: r for r in rows if (r["setting"], r["method"], r["model"]) == ("underfit", "fo", "net_a")}
    for seed, change in zip(range(3), (0.5, -0.25, 1.0)):
        append_row(sampled, {**fo[seed], "curvature_fraction": 0.25, "wall_seconds": 12.0,
                             "final_top1": fo[seed]["final_top1"] + change})
    append_row(sampled, {**fo[0], "method": "conv", "seed": 5, "curvature_fraction": 0.25, "commit": "abc"})
    report(plain, tmp_path / "plain" / "g.md")
    report(sampled, tmp_path / "sampled" / "g.md")
    # the lines but the one counting rows by their recorded commit
    before, after = [[line for line in (tmp_path / name / "g.md").read_text().split("\n") if not line.startswith("Code: ")]
                     for name in ("plain", "sampled")]
    section = after.index("## Curvature from a sample (rho)")
    end = after.index("", section + 4)       # the heading, a blank line, the text, a blank line, the table
    assert "Curvature" not in "\n".join(before)
    # every other line is the same: the tables, verdicts, pooled tests and plot hold rho = 1 alone
    pooled = after[end + 1]                  # the pooled line of each rho, after a blank line
    assert after[3:section] + after[end + 3:] == before[3:]
    # by hand: mean 0.417 and std 0.629 of (0.5, -0.25, 1.0); 1.96 * 0.629 / sqrt(3) = 0.712
    assert pooled == ("- rho 0.25, every cell pooled: +0.42 ± 0.63 over 3 pairs (2 better, 1 worse), sign-flip p "
                      "0.500; normal 95 % interval of the mean -0.30 to +1.13.")
    table = after[section + 4:end]
    assert len(table) == 3                   # the header, its rule and underfit's fo on net_a
    assert table[2] == ("| underfit | engine | 1,000 | net_a | fo | optimizer | 0.25 | 3 | +0.42 ± 0.63 | 2 / 1 | "
                        "0.500 | 82.42 ± 1.22 | 82.00 ± 0.92 | 12.0 ± 0.0 | 10.0 ± 0.0 |")


def test_pooled_cells_name_the_adaptive_default_preconditioned_and_count_a_seed_once():
    """Under AdamW `optimizer` runs are `preconditioned` ones: the pooled tables merge them by seed (the
    `preconditioned` run kept where both exist), and leave the SGD families' cells alone."""
    from study.report import ADAPTIVE, pooled_cells

    def row(method, rule, seed, top1):
        return {"model": "m", "method": method, "alpha_rule": rule, "seed": seed, "final_top1": top1,
                "gamma": 0.5, "alpha_scale": 1.0, "curvature_fraction": 1.0}

    runs = [row("none", "-", s, 60.0) for s in (0, 1)] + [
        row("full", "preconditioned", 0, 61.0), row("full", DEFAULT_RULE, 0, 99.0), row("full", DEFAULT_RULE, 1, 62.0),
        row("conv", DEFAULT_RULE, 1, 63.0)]
    cells = pooled_cells(runs, ADAPTIVE)
    assert sorted(cells) == [("m", "conv", "preconditioned"), ("m", "full", "preconditioned"), ("m", "none", "-")]
    assert sorted((r["seed"], r["final_top1"]) for r in cells["m", "full", "preconditioned"]) == [(0, 61.0), (1, 62.0)]
    assert ("m", "full", DEFAULT_RULE) in pooled_cells(runs, "SGD + momentum")


def test_equal_compute_epochs_from_a_cost_ratio_by_hand():
    from study.settings import equal_compute_epochs
    assert equal_compute_epochs(30, 2.4) == 72            # 30 x 2.4
    assert equal_compute_epochs(30, 1.15) == 35           # 34.5: halves round up
    assert equal_compute_epochs(5, 1.3) == 7              # 6.5
    assert equal_compute_epochs(40, 1.01) == 40           # 40.4
    assert equal_compute_epochs(40, 0.9) == 40            # never fewer epochs than the method's own
    # the same schedule shape: AdamW's 2 warmup epochs of 30 become 5 of 72 (4.8), the cosine runs over all 72
    run = Run("converged-adamw", "engine", "none", "convnext_atto", 3, 72, 3000, "-", compute_of="full",
              base_epochs=30, cost_ratio=2.4)
    options = paths.train_options(run, None, "")
    assert (options["epochs"], options["warmup_epochs"], options["variant"]) == (72, 5, "none")
    assert paths.train_options(Run("converged-adamw", "engine", "none", "convnext_atto", 3, 30, 3000, "-"), None,
                               "")["warmup_epochs"] == 2
    assert paths.train_options(replace(run, model="vit_tiny_patch16_224"), None, "")["model_kwargs"] == {
        "patch_size": 4}


def csv_row(method, seed, seconds, top1=80.0, model="resnet18", epochs=30, **kw):
    """A finished converged run as the CSV holds it (strings)."""
    run = Run("converged", "engine", method, model, seed, epochs, 3000, "-" if method in BASELINES else DEFAULT_RULE,
              **kw)
    row = {c: "" for c in COLUMNS} | {k: "" if v is None else str(v) for k, v in asdict(run).items()}
    return row | {"device": "gpu test", "wall_seconds": str(seconds), "final_top1": str(top1), "commit": "abc"}


def test_equal_compute_runs_are_planned_from_the_measured_ratio_once_two_seeds_are_in():
    from study.matrix import Planner, measured_cost_ratio
    base = plan("converged", "main", ("none", "full", "sam"), ("resnet18",), (0, 1, 2), DEFAULT_RULE)
    planner = Planner(base, ("full", "sam"), "gpu test")
    rows = [csv_row("none", 0, 10.0), csv_row("full", 0, 24.0)]
    assert planner(rows) == base                           # one seed: no ratio yet
    rows += [csv_row("none", 1, 10.0), csv_row("full", 1, 26.0), csv_row("sam", 1, 20.0),
             csv_row("full", 1, 99.0, model="convnext_atto")]   # another model: not paired
    full = next(r for r in base if r.method == "full")
    assert measured_cost_ratio(rows, "gpu test", full) == 2.5   # (24 + 26) / (10 + 10), seeds 0 and 1
    # a row from before rows recorded their commit (its machine's load unknown) does not count
    assert measured_cost_ratio([r | {"commit": ""} if r["seed"] == "1" else r for r in rows], "gpu test",
                               full) is None
    extra = [r for r in planner(rows) if r not in base]
    # full: 30 x 2.5 = 75 epochs of none, for every seed; sam has one paired seed only
    assert {(r.method, r.compute_of, r.epochs, r.base_epochs, r.cost_ratio) for r in extra} == {
        ("none", "full", 75, 30, 2.5)}
    assert sorted(r.seed for r in extra) == [0, 1, 2]
    # a ratio once taken is kept: a slower seed later changes nothing in this session ...
    rows += [csv_row("none", 2, 10.0), csv_row("full", 2, 40.0)]
    assert {r.epochs for r in planner(rows) if r.compute_of == "full"} == {75}
    # ... nor in the next, which reads it from the equal-compute rows already in the CSV
    done = csv_row("none", 0, 31.0, epochs=75, compute_of="full", base_epochs=30, cost_ratio=2.5)
    assert {r.epochs for r in Planner(base, ("full",), "gpu test")(rows + [done]) if r.compute_of} == {75}
    # the key tells an equal-compute run from a plain `none` run of the same epochs
    assert key(done) != key(csv_row("none", 0, 31.0, epochs=75))


def test_a_row_cut_short_is_left_out_and_old_rows_read_as_unknown_code(tmp_path):
    results = tmp_path / "cut.csv"
    append_row(results, csv_row("none", 0, 10.0) | {"commit": ""})   # a row from before commits were recorded
    with open(results, "a") as f:
        f.write('"gpu test",converged,engine,full,resnet18,0,30')   # killed while writing
    (row,) = read_rows(results)
    assert row["method"] == "none" and row["commit"] == "" and row["tree_clean"] == ""
    assert [r["base_epochs"] for r in read_rows(results)] == ["0"]


def test_rows_record_a_commit_only_for_the_code_that_runs(tmp_path, monkeypatch):
    """A frozen copy of a commit, run with the editable install of another checkout, would record the copy's
    commit for the checkout's code: refused, naming the fix."""
    monkeypatch.setenv("STUDY_COMMIT", "abc1234")
    monkeypatch.setenv("STUDY_TREE_CLEAN", "yes")
    assert code_state(ROOT) == ("abc1234", "yes")
    with pytest.raises(SystemExit, match=f"not from {tmp_path}: .* run with PYTHONPATH={tmp_path}$"):
        code_state(tmp_path)


def compute_rows():
    """converged, SGD: on net_a full gains 1.0 at equal epochs (5 seeds) but loses 0.5 to none given its compute
    (2.5x); sam gains 0.8 at equal epochs and 0.3 at equal compute, on every seed."""
    rows = []
    for seed in range(5):
        wobble = 0.1 * (seed - 2)
        rows.append(csv_row("none", seed, 10.0, 80.0 + seed, model="net_a"))
        rows.append(csv_row("full", seed, 25.0, 81.0 + seed + wobble, model="net_a"))
        rows.append(csv_row("sam", seed, 20.0, 80.8 + seed, model="net_a"))
        rows.append(csv_row("none", seed, 25.0, 81.5 + seed + wobble, model="net_a", epochs=75, compute_of="full",
                            base_epochs=30, cost_ratio=2.5))
        rows.append(csv_row("none", seed, 20.0, 80.5 + seed, model="net_a", epochs=60, compute_of="sam",
                            base_epochs=30, cost_ratio=2.0))
    return rows


def test_report_gives_both_comparisons_and_the_verdict_at_equal_compute(tmp_path):
    pytest.importorskip("matplotlib")
    results, doc = tmp_path / "results.csv", tmp_path / "g.md"
    for row in compute_rows():
        append_row(results, row | {"final_train_loss": "0.01", "test_loss": "0.4", "commit": "abc", "tree_clean": "yes",
                                   "gamma": "0.5", "alpha_scale": "1.0"})
    report(results, doc)
    text = doc.read_text()
    section = text.split("## Does MLTP pay for its cost? Equal compute", 1)[1].split("## Verdicts", 1)[0]
    # by hand: full - none = 1.0 + wobble (mean 1.00, std 0.16); full - none at 75 epochs = -0.5 on every seed;
    # five pairs of one sign: sign-flip p 2/32 = 0.0625 < 0.1
    assert ("| SGD + momentum | net_a | full | 5 | 2.50x | 30 / 75 | 1.00 ± 0.16 (n=5) | 0.062 | -0.50 ± 0.00 (n=5) | "
            "0.062 | loses |") in section
    assert ("| SGD + momentum | net_a | sam | 5 | 2.00x | 30 / 60 | 0.80 ± 0.00 (n=5) | 0.062 | 0.30 ± 0.00 (n=5) | "
            "0.062 | pays |") in section
    assert ("- net_a, SGD + momentum: MLTP **does not pay** at equal compute (top-1 minus standard training run as "
            "long as the method took, paired by seed): full -0.50 ± 0.00 (p 0.062, 5 seeds). SAM, the anchor: "
            "+0.80 ± 0.00 at equal epochs (p 0.062), +0.30 ± 0.00 (p 0.062, 5 seeds) at equal compute.") in section
    # the group's table (top-1 std 1.1 x std(0..4) = 1.74): the equal-compute column beside the equal-epoch one;
    # equal-compute runs make no cell of their own
    group = text.split("## Setting `converged`", 1)[1]
    assert "| net_a | full | optimizer | 83.00 ± 1.74 (n=5) | 0.4000 ± 0.0000 (n=5) | 0.0100 ± 0.0000 (n=5) | " \
        "1.00 ± 0.16 (n=5) | -0.50 ± 0.00 (n=5) | 0.20 ± 0.16 (n=5) |" in group
    assert group.count("| net_a | none |") == 1
    assert "Code: 25 of 25 rows record their commit (25 from a clean tree, 1 commit(s))" in text
    assert doc.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_readme_picture_holds_both_comparisons(tmp_path):
    pytest.importorskip("matplotlib")
    import figures
    results = tmp_path / "results.csv"
    for row in compute_rows():
        append_row(results, row | {"commit": "abc", "tree_clean": "yes", "gamma": "0.5", "alpha_scale": "1.0"})
    drawn = {name: (epochs, compute) for name, epochs, compute in figures.pooled_rows(results)}
    epochs, compute = drawn["SGD + momentum: net_a, full"]
    # by hand (compute_rows): full - none = 1.0 + wobble at equal epochs, -0.5 on every seed at equal compute
    assert statistics.fmean(epochs) == pytest.approx(1.0) and len(epochs) == 5
    assert compute == pytest.approx([-0.5] * 5)
    assert drawn["SGD + momentum: net_a, sam"][1] == pytest.approx([0.3] * 5)
    figures.draw_pooled(results, tmp_path / "pooled.png")
    assert (tmp_path / "pooled.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pays_needs_pairs_enough_for_the_sign_flip_test_to_decide():
    from study.report import pays
    # 4 pairs of one sign: p = 2/16 = 0.125, above the level 0.1 whatever they say: undecided, not "does not pay"
    assert pays([1.0, 2.0, 0.5, 0.1]) == "undecided (4 pairs)"
    assert pays([1.0, 2.0, 0.5, 0.1, 0.3]) == "pays"          # p = 2/32
    assert pays([-1.0, -2.0, -0.5, -0.1, -0.3]) == "loses"
    assert pays([1.0, -2.0, 0.5, -0.1, 0.3]) == "does not pay"
