"""The pictures README.md and docs/performance.md show, each drawn from a results file: no number is typed in here.

    python benchmarks/figures.py                  # docs/pooled.png and docs/step_cost.png
    python benchmarks/figures.py --only pooled    # one of them

pooled     the study's pooled paired differences (top-1 minus standard training's on the same seed), per optimizer
           family, model and method at the default inner-step rule, at equal epochs and (hollow) against standard
           training given the method's measured compute: the numbers `generalization.py --report` pools
           (benchmarks/study/report.py), from benchmarks/results/generalization.csv
step_cost  cost per training sample against image size, from the tables of benchmarks/results/step_cost_cpu.md

Benchmark-only dependency: matplotlib.
"""
from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

from study.report import METHODS, compute_pairs, pooled_differences, sign_flip_p
from study.results import numeric, read_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
# the step-cost rows the performance page plots: the baseline, first order, and the second order with and
# without the curvature sample (the two regimes are where the last two part)
COST_ROWS = ("standard on 2B", "none", "fo", "full, fd", "full, fd, rho 1/4", "full, exact", "full, exact, rho 1/4")
# a table's title line in step_cost_cpu.md: "resnet18, 32x32, B=32, cpu, ..."
TITLE = re.compile(r"^(?P<model>[\w.-]+), (?P<size>\d+)x\d+, B=")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


MIN_PAIRS = 3   # fewer pairs decide nothing (the sign-flip p of 2 pairs is at least 0.5): left to the report


def pooled_rows(csv_path: Path) -> list[tuple[str, list[float], list[float]]]:
    """(label, paired differences against `none` at equal epochs, and against `none` given the method's measured
    compute) per optimizer family, model and method, in the report's order; cells of at least MIN_PAIRS pairs (an
    equal-compute side with fewer is left empty)."""
    rows = numeric(read_rows(csv_path))
    pooled, compute = pooled_differences(rows, by_family=True), compute_pairs(rows)
    order = sorted(pooled, key=lambda k: (k[0], k[1], METHODS.index(k[2]) if k[2] in METHODS else 99))
    out = []
    for key in order:
        epochs = pooled[key]["none"]
        at_compute = compute[key]["compute"] if key in compute else []
        if len(epochs) >= MIN_PAIRS:
            out.append((f"{key[0]}: {key[1]}, {key[2]}", epochs, at_compute if len(at_compute) >= MIN_PAIRS else []))
    return out


def draw_pooled(csv_path: Path, png: Path) -> None:
    """A forest plot: each pair a faint dot, the mean with one std either side, n and the sign-flip p beside it;
    filled at equal epochs, hollow (just below) against standard training given the method's compute."""
    rows = pooled_rows(csv_path)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.36 * len(rows) + 1.4))
    for y, (name, diffs, at_compute) in enumerate(reversed(rows)):
        notes = []
        for offset, values, hollow in ((0.0, diffs, False), (-0.3, at_compute, True)):
            if not values:
                continue
            mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            color = "tab:gray" if "sam" in name.split(", ")[-1] else ("tab:blue" if mean >= 0 else "tab:red")
            ax.scatter(values, [y + offset] * len(values), s=8, color=color, alpha=0.3, lw=0)
            ax.errorbar(mean, y + offset, xerr=std, fmt="o", color=color, ms=5, capsize=3,
                        mfc="white" if hollow else color)
            notes.append(f"{'equal compute: ' if hollow else ''}n {len(values)}, p {sign_flip_p(values):.2g}")
        ax.annotate("; ".join(notes), (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [name for name, _, _ in reversed(rows)], fontsize=7)
    ax.set_xlabel("test top-1 minus standard training's, same seed (points): mean ± std, dots: pairs; "
                  "filled: equal epochs, hollow: standard training given the method's compute", fontsize=7)
    ax.set_title("MLTP (default inner-step rule) and SAM against standard training, pooled over settings", fontsize=9)
    save(fig, png)


def step_cost_tables(md_path: Path) -> dict[tuple[str, int], dict[str, float]]:
    """(model, image size) -> {row: per-sample cost vs standard}, from the file's markdown tables. A row measured
    again further down (the file's later repeats) keeps its first, main value."""
    tables, current = {}, None
    for line in md_path.read_text().splitlines():
        title = TITLE.match(line)
        if title:
            current = tables.setdefault((title["model"], int(title["size"])), {})
        elif current is not None and line.startswith("| ") and line.split("|")[2].strip().endswith("x"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            current.setdefault(cells[0], float(cells[1].rstrip("x")))
    return tables


def draw_step_cost(md_path: Path, png: Path) -> None:
    """One panel per model: each row's per-sample cost (vs a standard step on B) against the image size."""
    tables = step_cost_tables(md_path)
    by_model = defaultdict(dict)
    for (model, size), rows in tables.items():
        by_model[model][size] = rows
    plt = pyplot()
    fig, axes = plt.subplots(1, len(by_model), figsize=(4.2 * len(by_model), 3.6), sharey=True, squeeze=False)
    for ax, (model, sizes) in zip(axes.flat, by_model.items()):
        bases = list(dict.fromkeys(row.split(", rho")[0] for row in COST_ROWS))
        for row in COST_ROWS:
            points = sorted((size, rows[row]) for size, rows in sizes.items() if row in rows)
            if points:   # a row and its curvature sample share a colour: dashed is the sample
                colour = plt.cm.tab10(bases.index(row.split(", rho")[0]))
                ax.plot(*zip(*points), marker="o", ms=4, label=row, color=colour, ls="--" if "rho" in row else "-")
        ax.axhline(1, color="black", lw=0.8)
        ax.set_xticks(sorted(sizes))
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("image size (px)", fontsize=8)
    axes.flat[0].set_ylabel("cost per sample / standard step's", fontsize=8)
    axes.flat[-1].legend(fontsize=7)
    save(fig, png)


def save(fig, png: Path) -> None:
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    print(f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")


FIGURES = {"pooled": lambda out: draw_pooled(RESULTS / "generalization.csv", out / "pooled.png"),
           "step_cost": lambda out: draw_step_cost(RESULTS / "step_cost_cpu.md", out / "step_cost.png")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(FIGURES), help="draw one figure (default: all)")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the PNGs (default: docs/)")
    args = parser.parse_args()
    for name, draw in FIGURES.items():
        if args.only in (None, name):
            draw(args.out)


if __name__ == "__main__":
    main()
