"""The report: the CSV turned into docs/generalization.md (tables, verdicts, pooled sign-flip tests, the
equal-compute comparison) and a plot of both comparisons."""
from __future__ import annotations

import itertools
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from .results import numeric, read_rows, superseded
from .settings import (BASELINES, BATCH_SIZE, DEFAULT_ALPHA_SCALE, DEFAULT_CURVATURE_FRACTION, DEFAULT_GAMMA,
                       DEFAULT_RULE, IMG_SIZE, METHODS, PATHS, SAM_RHO, SEEDS, SETTINGS)


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


def _order(items, known) -> list:
    return [x for x in known if x in items] + sorted(set(items) - set(known))


def curvature_fraction(row: dict) -> float:
    """The run's rho; rows from before the study varied it (no value) took H_i v on all of task i."""
    rho = row.get("curvature_fraction", DEFAULT_CURVATURE_FRACTION)
    rho = DEFAULT_CURVATURE_FRACTION if rho in ("", None) else float(rho)
    return DEFAULT_CURVATURE_FRACTION if math.isnan(rho) else rho


def full_curvature(row: dict) -> bool:
    """Whether H_i v was taken on all of task i (rho = 1): only those runs enter the tables, verdicts, pooled
    tests and plot; runs at rho < 1 appear in "Curvature from a sample" alone."""
    return curvature_fraction(row) >= 1


def group_epochs(row: dict) -> int:
    """The epochs of the group a run is compared in: an equal-compute run's is that of the runs whose compute it
    got (`base_epochs`), any other run's its own."""
    return int(row["base_epochs"]) if row.get("compute_of") else int(row["epochs"])


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(setting, path, training samples, epochs, device) -> runs at rho = 1: what must match for runs to be
    compared (equal-compute runs with the group whose compute they got)."""
    by_key = defaultdict(list)
    for row in filter(full_curvature, rows):
        by_key[row["setting"], row["path"], int(row["train_samples"]), group_epochs(row), row["device"]].append(row)
    settings, paths = _order({k[0] for k in by_key}, SETTINGS), _order({k[1] for k in by_key}, PATHS)
    return dict(sorted(by_key.items(), key=lambda kv: (settings.index(kv[0][0]), paths.index(kv[0][1]), kv[0][2],
                                                       -len(kv[1]))))


def main_cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(model, method, alpha_rule) -> runs at the default gamma and alpha_scale, one per seed (equal-compute runs
    apart: `equal_compute_cells`)."""
    cells = defaultdict(list)
    for row in filter(full_curvature, rows):
        if row["gamma"] == DEFAULT_GAMMA and row["alpha_scale"] == DEFAULT_ALPHA_SCALE and not row.get("compute_of"):
            cells[row["model"], row["method"], row["alpha_rule"]].append(row)
    return cells


def equal_compute_cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(model, method) -> the `none` runs given that method's measured compute (issue 24), one per seed."""
    cells = defaultdict(list)
    for row in rows:
        if row.get("compute_of"):
            cells[row["model"], row["compute_of"]].append(row)
    return cells


def equal_compute_differences(cells, compute_cells, cell: tuple, column: str = "final_top1") -> list[float]:
    """Per seed: the cell minus standard training given its measured compute, on the same model and seed."""
    base = {r["seed"]: r[column] for r in compute_cells.get((cell[0], cell[1]), [])}
    return [r[column] - base[r["seed"]] for r in cells.get(cell, []) if r["seed"] in base]


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
    cells, compute_cells = main_cells(rows), equal_compute_cells(rows)
    lines = ["| model | method | alpha rule | final top-1 | test loss | train loss | top-1 - none, paired | "
             "top-1 - none at equal compute, paired | top-1 - SAM, paired | relative inner step | inner / last update "
             "| cosine | 2nd-order share | wall time vs none |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell in cell_order(cells):
        runs = cells[cell]
        model, method, rule = cell
        vs_none = paired_differences(cells, cell, "none") if method != "none" else []
        vs_compute = equal_compute_differences(cells, compute_cells, cell)
        vs_sam = paired_differences(cells, cell, "sam") if method != "sam" else []
        ratio = cost_ratio(cells, cell)
        seconds = statistics.fmean(r["wall_seconds"] for r in runs)
        inner = [] if method in BASELINES else finite(runs, "mean_relative_step")
        cost = f"{ratio:.2f}x ({seconds:.0f} s)" if ratio else f"- ({seconds:.0f} s)"
        lines.append(f"| {model} | {method} | {rule} | {fmt([r['final_top1'] for r in runs])} | "
                     f"{fmt([r['test_loss'] for r in runs], 4)} | {fmt([r['final_train_loss'] for r in runs], 4)} | "
                     f"{fmt(vs_none)} | {fmt(vs_compute)} | {fmt(vs_sam)} | {fmt(inner, 1, 'e')} | "
                     f"{fmt([] if method in BASELINES else finite(runs, 'mean_update_ratio'))} | "
                     f"{fmt([] if method == 'sam' else finite(runs, 'mean_grad_cosine'), 3)} | "
                     f"{fmt([] if method in BASELINES else finite(runs, 'mean_second_order_share'))} | {cost} |")
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


# pooled besides the default: the rules issue 16 compared under AdamW (`update` was the default there until then)
POOLED_RULES = ("-", DEFAULT_RULE, "preconditioned", "update")
ADAPTIVE = "adaptive (AdamW)"


def optimizer_family(group: tuple) -> str:
    """The optimizer a group's runs stepped with: the engine's SGD has momentum, the Trainer's `sgd` has none."""
    setting = SETTINGS.get(group[0])
    if setting is not None and setting.opt != "sgd":
        return ADAPTIVE
    return "SGD" if group[1] == "hf-trainer" else "SGD + momentum"


# the default rule's rows per family: under AdamW `optimizer` preconditions (since issue 16), as the study's
# `preconditioned` rows do; its rows under AdamW before that are labelled `update`
FAMILY_DEFAULT = {"SGD": (DEFAULT_RULE,), "SGD + momentum": (DEFAULT_RULE,),
                  ADAPTIVE: ("preconditioned",)}


def pooled_cells(runs: list[dict], family: str) -> dict[tuple, list[dict]]:
    """`main_cells` for the pooled tables: under an adaptive optimizer the default rule's cells are named
    `preconditioned` (what it does there since issue 16), and a seed run under both names counts once (the
    `preconditioned` run), so that no pair enters a pooled test twice."""
    cells = main_cells(runs)
    if family != ADAPTIVE:
        return cells
    merged = {cell: rows for cell, rows in cells.items() if cell[2] != DEFAULT_RULE}
    for (model, method, rule), rows in cells.items():
        if rule == DEFAULT_RULE:
            target = (model, method, "preconditioned")
            seen = {r["seed"] for r in merged.get(target, [])}
            merged[target] = merged.get(target, []) + [r for r in rows if r["seed"] not in seen]
    return merged


def pooled_groups(rows: list[dict]):
    """(group, optimizer family, `pooled_cells`) of every group of the current settings: what the pooled
    tables read."""
    for group, runs in groups(rows).items():
        if group[0] in SETTINGS and SETTINGS[group[0]].pooled:
            family = optimizer_family(group)
            yield group, family, pooled_cells([r for r in runs if not superseded(r)], family)


def pooled_differences(rows: list[dict], by_family: bool = False) -> dict[tuple, dict[str, list[float]]]:
    """(model, method, alpha_rule) -> {"none": [...], "sam": [...]}: the paired differences of every group of
    the current settings, pooled (by_family: keyed (family, model, method) over the family's default rule). Each
    difference still pairs two runs of one group and seed."""
    pooled = defaultdict(lambda: defaultdict(list))
    for _, family, cells in pooled_groups(rows):
        for cell in cells:
            if cell[1] == "none" or cell[2] not in (POOLED_RULES if not by_family else ("-",) + FAMILY_DEFAULT[family]):
                continue
            key = (family, cell[0], cell[1]) if by_family else cell
            for baseline in BASELINES:
                if cell[1] != baseline:
                    pooled[key][baseline] += paired_differences(cells, cell, baseline)
    return pooled


def family_table(rows: list[dict]) -> list[str]:
    """Issue 16's test of the default per optimizer family: pooled paired differences with the sign-flip p,
    and every cell (setting, path, size, model) where the default lost more than standard training's seed std."""
    pooled = pooled_differences(rows, by_family=True)
    lines = ["| optimizer | model | method | pairs | top-1 - none | better / worse | p (sign flip) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(pooled, key=lambda k: (k[0], k[1], METHODS.index(k[2]) if k[2] in METHODS else 99)):
        diffs = pooled[key]["none"]
        if diffs:
            wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(diffs)} | {fmt(diffs)} | {wins} / {losses} | "
                         f"{p_value(sign_flip_p(diffs))} |")
    worse = []
    for group, family, cells in pooled_groups(rows):
        for cell in cells:
            if cell[1] in BASELINES or cell[2] not in FAMILY_DEFAULT[family] or (cell[0], "none", "-") not in cells:
                continue
            diffs = paired_differences(cells, cell, "none")
            spread = mean_std([r["final_top1"] for r in cells[(cell[0], "none", "-")]])[1] or 0.0
            if diffs and statistics.fmean(diffs) < -spread:
                worse.append(f"{cell[1]} on {cell[0]} in `{group[0]}` {group[1]} ({statistics.fmean(diffs):+.2f} "
                             f"over {len(diffs)} seeds, std of none {spread:.2f})")
    lines += ["", "- The default loses more than standard training's seed-to-seed std in: "
              + ("; ".join(worse) if worse else "no cell") + "."]
    return lines


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


PAYS_LEVEL = 0.1   # with 5 pairs the smallest two-sided sign-flip p is 2/32 = 0.0625: 0.05 could never be reached


def compute_pairs(rows: list[dict]) -> dict[tuple, dict]:
    """(optimizer family, model, method) -> the paired differences to standard training at equal epochs and at
    equal compute, on the same seeds (those with an equal-compute run), pooled over the current settings' groups
    (rows the code no longer makes left out); with the measured cost ratios and the equal-compute epochs. The
    MLTP methods at their family's default rule, and SAM."""
    pooled = defaultdict(lambda: {"epochs": [], "compute": [], "ratios": set(), "none_epochs": set(),
                                  "base_epochs": set()})
    for group, runs in groups(rows).items():
        if group[0] not in SETTINGS or not SETTINGS[group[0]].pooled:
            continue
        family = optimizer_family(group)
        current = [r for r in runs if not superseded(r)]
        cells, compute_cells = pooled_cells(current, family), equal_compute_cells(current)
        for cell in cells:
            model, method, rule = cell
            baseline = cells.get((model, "none", "-"), [])
            compute = {r["seed"]: r for r in compute_cells.get((model, method), [])}
            if method == "none" or rule not in ("-",) + FAMILY_DEFAULT[family] or not compute:
                continue
            none = {r["seed"]: r["final_top1"] for r in baseline}
            entry = pooled[family, model, method]
            for row in cells[cell]:
                if row["seed"] in compute and row["seed"] in none:
                    entry["epochs"].append(row["final_top1"] - none[row["seed"]])
                    entry["compute"].append(row["final_top1"] - compute[row["seed"]]["final_top1"])
                    entry["ratios"].add(compute[row["seed"]]["cost_ratio"])
                    entry["none_epochs"].add(int(compute[row["seed"]]["epochs"]))
                    entry["base_epochs"].add(group[3])
    return {k: v for k, v in pooled.items() if v["compute"]}


def pays(diffs: list[float]) -> str:
    """At equal compute: `pays` (a gain the sign-flip test tells from zero at PAYS_LEVEL), `loses` (such a loss),
    `undecided` (too few pairs for any sign pattern to reach the level: fewer than 5) or `does not pay`."""
    p = sign_flip_p(diffs)
    if p < PAYS_LEVEL:
        return "pays" if statistics.fmean(diffs) > 0 else "loses"
    if 2.0 ** (1 - len(diffs)) >= PAYS_LEVEL:   # even pairs all of one sign could not reach the level
        return f"undecided ({len(diffs)} pairs)"
    return "does not pay"


def compute_table(rows: list[dict]) -> list[str]:
    """Both comparisons side by side, per optimizer family, model and method."""
    pooled = compute_pairs(rows)
    if not pooled:
        return []
    lines = ["| optimizer | model | method | pairs | cost ratio (wall time) | epochs: method / none at equal compute | "
             "top-1 - none, equal epochs | p | top-1 - none, equal compute | p | at equal compute |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(pooled, key=lambda k: (k[0], k[1], METHODS.index(k[2]) if k[2] in METHODS else 99)):
        entry = pooled[key]
        ratios = sorted(x for x in entry["ratios"] if isinstance(x, float) and math.isfinite(x))
        ratio = "-" if not ratios else " / ".join(f"{x:.2f}x" for x in ratios)
        epochs = f"{'/'.join(map(str, sorted(entry['base_epochs'])))} / {'/'.join(map(str, sorted(entry['none_epochs'])))}"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(entry['compute'])} | {ratio} | {epochs} | "
                     f"{fmt(entry['epochs'])} | {p_value(sign_flip_p(entry['epochs']))} | {fmt(entry['compute'])} | "
                     f"{p_value(sign_flip_p(entry['compute']))} | {pays(entry['compute'])} |")
    return lines


def compute_verdicts(rows: list[dict]) -> list[str]:
    """One sentence per model and optimizer: does MLTP pay for its cost (issue 24)?"""
    pooled, lines = compute_pairs(rows), []
    for family, model in sorted({k[:2] for k in pooled}):
        methods = [k for k in pooled if k[:2] == (family, model)]
        methods.sort(key=lambda k: METHODS.index(k[2]) if k[2] in METHODS else 99)

        def said(k):
            diffs = pooled[k]["compute"]
            return f"{k[2]} {difference(diffs)} (p {p_value(sign_flip_p(diffs))}, {len(diffs)} seeds)"

        mltp = [k for k in methods if k[2] not in BASELINES]
        said_of = [pays(pooled[k]["compute"]) for k in mltp]
        if "pays" in said_of:
            verb = "**pays**"
        elif not mltp or all(s.startswith("undecided") for s in said_of):
            verb = "is **undecided**"   # no runs, or too few pairs for the sign-flip test to reach its level
        else:
            verb = "**does not pay**"
        details = "; ".join(map(said, mltp)) if mltp else "no MLTP variant has equal-compute runs yet"
        sam = [k for k in methods if k[2] == "sam"]
        anchor = ""
        if sam:   # the anchor: does the known regulariser help here at all (at equal epochs), and at its cost?
            epochs = pooled[sam[0]]["epochs"]
            anchor = (f" SAM, the anchor: {difference(epochs)} at equal epochs (p {p_value(sign_flip_p(epochs))}), "
                      f"{said(sam[0]).removeprefix('sam ')} at equal compute.")
        lines.append(f"- {model}, {family}: MLTP {verb} at equal compute (top-1 minus standard training run as "
                     f"long as the method took, paired by seed): {details}." + anchor)
    return lines


def curvature_pairs(rows: list[dict]) -> list[tuple[tuple, float, list[dict], list[dict]]]:
    """(setting, path, train samples, epochs, device, model, method, alpha_rule), rho, runs at rho, runs at 1:
    each MLTP cell run at rho < 1 and at rho = 1 (default gamma and alpha_scale), on the seeds both have, in
    seed order; one entry per rho < 1."""
    cells = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        default = row["gamma"] == DEFAULT_GAMMA and row["alpha_scale"] == DEFAULT_ALPHA_SCALE
        if row["method"] not in BASELINES and default:
            cell = (row["setting"], row["path"], int(row["train_samples"]), int(row["epochs"]), row["device"],
                    row["model"], row["method"], row["alpha_rule"])
            cells[cell][curvature_fraction(row)][int(row["seed"])] = row
    settings = _order({c[0] for c in cells}, SETTINGS)
    paths = _order({c[1] for c in cells}, PATHS)
    methods = _order({c[6] for c in cells}, METHODS)
    out = []
    for cell in sorted(cells, key=lambda c: (settings.index(c[0]), paths.index(c[1]), c[2], c[3], c[4], c[5],
                                             methods.index(c[6]), c[7])):
        full = cells[cell].get(DEFAULT_CURVATURE_FRACTION, {})
        for rho in sorted((r for r in cells[cell] if r < 1), reverse=True):
            seeds = sorted(set(cells[cell][rho]) & set(full))
            if seeds:
                out.append((cell, rho, [cells[cell][rho][s] for s in seeds], [full[s] for s in seeds]))
    return out


def curvature_table(rows: list[dict]) -> list[str]:
    """Per cell with runs at rho < 1 and rho = 1 on the same seeds: the paired top-1 difference (rho < 1 minus
    rho = 1), its sign-flip p, and each side's mean top-1 and wall time."""
    pairs = curvature_pairs(rows)
    if not pairs:
        return []

    def spread(values, digits=2):
        mean, std = mean_std(values)
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    lines = ["| setting | path | images | model | method | alpha rule | rho | pairs | top-1 (rho) - top-1 (1), "
             "paired | better / worse | p (sign flip) | top-1 at rho | top-1 at 1 | wall s at rho | wall s at 1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (setting, path, n, _, _, model, method, rule), rho, sample, full in pairs:
        diffs = [a["final_top1"] - b["final_top1"] for a, b in zip(sample, full)]
        wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        top1, wall = [[spread([r[c] for r in side], d) for side in (sample, full)]
                      for c, d in (("final_top1", 2), ("wall_seconds", 1))]
        lines.append(f"| {setting} | {path} | {n:,} | {model} | {method} | {rule} | {rho:g} | {len(diffs)} | "
                     f"{difference(diffs)} | {wins} / {losses} | {p_value(sign_flip_p(diffs))} | "
                     f"{top1[0]} | {top1[1]} | {wall[0]} | {wall[1]} |")
    for rho in sorted({rho for _, rho, _, _ in pairs}, reverse=True):
        diffs = [a["final_top1"] - b["final_top1"] for _, r, sample, full in pairs if r == rho
                 for a, b in zip(sample, full)]
        mean, std = mean_std(diffs)
        half = 1.96 * std / math.sqrt(len(diffs)) if std is not None else math.nan
        lines.append(f"\n- rho {rho:g}, every cell pooled: {difference(diffs)} over {len(diffs)} pairs "
                     f"({sum(d > 0 for d in diffs)} better, {sum(d < 0 for d in diffs)} worse), sign-flip p "
                     f"{p_value(sign_flip_p(diffs))}; normal 95 % interval of the mean {mean - half:+.2f} to "
                     f"{mean + half:+.2f}.")
    return lines


def sensitivity_grids(rows: list[dict]) -> dict[tuple, dict[tuple, list[float]]]:
    """(model, method, alpha_rule) -> {(gamma, alpha_scale): final top-1 values}, where more than one cell was
    run. Only seeds that every cell has count: the default cell also holds the main matrix's other seeds,
    and comparing a 3-seed mean with 1-seed cells would mix seed noise into the grid."""
    grids = defaultdict(lambda: defaultdict(dict))
    for row in filter(full_curvature, rows):
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


def plot(rows: list[dict], path: Path, equal_compute_only: bool = False) -> bool:
    """One panel per group: each cell's top-1 minus `none`'s on the same seed, at equal epochs (filled) and, where
    the group has equal-compute runs, minus `none` given the cell's measured compute (hollow, beside it). The
    groups with equal-compute runs come first; equal_compute_only: only those (a compact figure for the README).
    False: nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [(g, main_cells(runs), equal_compute_cells(runs)) for g, runs in groups(rows).items()]
    panels = [(g, cells, compute) for g, cells, compute in panels
              if any(c[1] == "none" for c in cells) and len(cells) > 1 and (compute or not equal_compute_only)]
    panels.sort(key=lambda panel: not panel[2])     # stable: the groups' order otherwise
    if not panels:
        return False
    columns = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / columns), columns, figsize=(5.5 * columns, 4.2 *
                             math.ceil(len(panels) / columns)), squeeze=False)
    for ax, (group, cells, compute_cells) in zip(axes.flat, panels):
        models = sorted({c[0] for c in cells})
        labels = list(dict.fromkeys((c[1], c[2]) for c in cell_order(cells) if c[1] != "none"))
        markers = dict(zip(models, "osD^v<>"))
        width = 0.8 / len(models)
        for j, model in enumerate(models):
            for i, (method, rule) in enumerate(labels):
                x = i + (j - (len(models) - 1) / 2) * width
                color = plt.cm.tab10(i % 10)
                compared = [(paired_differences(cells, (model, method, rule), "none"), x, color)]
                if compute_cells:   # equal compute beside it, hollow
                    compared.append((equal_compute_differences(cells, compute_cells, (model, method, rule)),
                                     x + 0.3 * width, "none"))
                    compared[0] = (compared[0][0], x - 0.15 * width, color)
                for diffs, at, face in compared:
                    if not diffs:
                        continue
                    ax.scatter([at] * len(diffs), diffs, facecolors=face, edgecolors=color, marker=markers[model],
                               alpha=0.4, s=18)
                    mean, std = mean_std(diffs)
                    ax.errorbar(at, mean, yerr=std or 0, color=color, marker=markers[model], capsize=3, ms=7,
                                mfc=color if face != "none" else "white")
            ax.scatter([], [], color="gray", marker=markers[model], label=model)
        if compute_cells:
            ax.scatter([], [], facecolors="white", edgecolors="gray", marker="o",
                       label="hollow: vs none at equal compute")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(labels)), [m if r in ("-", DEFAULT_RULE) else f"{m}\n{r}" for m, r in labels],
                      fontsize=8)
        ax.set_ylabel("top-1 minus none's, same seed (points)" if not compute_cells else
                      "top-1 minus none's, same seed: equal epochs / equal compute", fontsize=8)
        ax.set_title(f"{group[0]}: {group[1]}, {group[2]:,} images, {group[3]} ep.", fontsize=9)
        ax.legend(title="model (points: seeds)", fontsize=7, title_fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def not_reproduced(runs: list[dict]) -> list[str]:
    """The group's cells the code as shipped no longer makes, with why: shown, but left out of pooled tables."""
    found = defaultdict(list)
    for row in runs:
        reason = superseded(row)
        if reason:
            found[reason, row["model"], row["method"], row["alpha_rule"]].append(int(row["seed"]))
    return [f"- Not reproducible with the code as shipped (left out of the pooled tables): {method} ({rule}) on "
            f"{model}, seeds {', '.join(map(str, sorted(seeds)))}: {reason}."
            for (reason, model, method, rule), seeds in found.items()]


def reproducibility(rows: list[dict]) -> list[str]:
    """Which code made the rows: recorded commits, clean trees, rows the code no longer makes."""
    recorded = [r for r in rows if r.get("commit")]
    clean = sum(r.get("tree_clean") == "yes" for r in recorded)
    gone = defaultdict(int)
    for row in rows:
        if superseded(row):
            gone[superseded(row)] += 1
    lines = [f"Code: {len(recorded)} of {len(rows)} rows record their commit ({clean} from a clean tree, "
             f"{len(set(r['commit'] for r in recorded))} commit(s)); the others predate the column. "
             f"`python benchmarks/generalization.py --rerun-sample N` reruns N rows of this device and compares "
             f"them to the last digit."]
    lines += [f"- {n} row(s) {reason}: not pooled." for reason, n in gone.items()]
    return lines


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
            sections += verdict_lines + [""] + findings(runs) + not_reproduced(runs) + [""]
            for (model, method, rule), grid in sensitivity_grids(runs).items():
                sections += [f"#### Sensitivity: {method} ({rule}) on {model}, final top-1", ""]
                sections += sensitivity_table(grid) + [""]
            if sensitivity_grids(runs):
                sections += sensitivity_findings(runs) + [""]
    lines = ["# Generalization: MLTP vs standard training vs SAM", "",
             f"Generated by `python benchmarks/generalization.py --report` from `{csv_path.name}` "
             f"({len(rows)} runs); every number below is computed from that file.", "",
             SETUP.format(img=IMG_SIZE, pair=2 * BATCH_SIZE, batch=BATCH_SIZE, rho=SAM_RHO, gamma=DEFAULT_GAMMA,
                          rule=DEFAULT_RULE)]
    compute = compute_table(rows)
    if compute:
        lines += ["## Does MLTP pay for its cost? Equal compute", "",
                  "Standard training (`none`) given the measured compute of each MLTP variant and of SAM: its epochs "
                  "scaled by the cost ratio, the wall time of the method's runs over `none`'s in the same group and "
                  "seeds (training and evaluation; taken once a cell has two paired seeds, then kept), rounded to "
                  "whole epochs; the same schedule shape (cosine over all epochs, warmup stretched alike), the "
                  "same seed. Pooled per optimizer and model over the current settings; both differences on the "
                  "same seeds, with the exact two-sided sign-flip p. `pays`: a gain at equal compute with p < "
                  f"{PAYS_LEVEL} (with 5 seeds the smallest p is 0.0625: all five pairs must agree); `loses`: such "
                  "a loss.", ""]
        lines += compute_verdicts(rows) + [""] + compute + [""]
    lines += ["## Verdicts", ""] + summary + [""] + reproducibility(rows) + [""]
    pooled = pooled_table(rows)
    if pooled:
        current = [name for name, setting in SETTINGS.items() if setting.pooled]
        lines += ["## Pooled over settings", "",
                  f"The paired differences of settings {', '.join(f'`{n}`' for n in current)} (every path, size and "
                  f"device), pooled per method and model; `better / worse` counts pairs. The p-value is the exact "
                  f"two-sided sign-flip test of the pooled pairs (no normality assumed).", ""]
        lines += pooled + [""] + pooled_findings(rows) + [""]
        lines += ["## The default per optimizer family", "",
                  "Issue 16's test: per optimizer family, the default rule's paired differences pooled over the "
                  "current settings (SGD: `MLTPTrainer`'s plain SGD; SGD + momentum: the recipe's; adaptive: "
                  "settings `adamw` and `finetune`, whose `preconditioned` rows are what `optimizer` does under "
                  "AdamW since then), and every cell where the default lost more than the std of standard "
                  "training over seeds.", ""]
        lines += family_table(rows) + [""]
    curvature = curvature_table(rows)
    if curvature:
        lines += ["## Curvature from a sample (rho)", "",
                  "MLTP with `curvature_fraction` rho < 1 takes H_i v on a random rho-share of task i (g_i and the "
                  "inner step keep all of it). Per cell run at rho < 1 and at rho = 1 (same setting, path, size, "
                  "model, method, rule and device): the paired difference of final top-1 on the seeds both have "
                  "(same initialisation, subset and data order), mean ± std over the pairs, the exact two-sided "
                  "sign-flip p, and each side's mean ± std of top-1 and of wall time (training and evaluation). "
                  "Runs at rho < 1 appear here only: every other table, verdict, pooled test and the plot hold "
                  "rho = 1 alone.", ""]
        lines += curvature + [""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    if plot(rows, png):
        lines += [f"![top-1 minus none's per seed, per setting: equal epochs, and equal compute where run]"
                  f"({png.name})", ""]
    doc.write_text("\n".join(lines + sections))
    print(f"wrote {doc}" + (f" and {png}" if png.is_file() else ""))
