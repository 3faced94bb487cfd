"""Does MLTP generalise better than standard training and SAM on the same data budget? (issue 5)

Every run goes through the engine (timm_mltp.engine): same data, augmentation, optimizer (SGD with
momentum), cosine schedule, task size B and epochs. Each optimizer step consumes 2B samples for every
method: MLTP takes them as task i and task j, `none` as two batches of standard training, and SAM
(pytorch-optimizer's, rho 0.05) as one batch of 2B taken twice (at w, then at w + e(w)).
One row per finished run is appended to a CSV; runs already there are skipped, so the matrix can be
filled over several sessions, and `--report` turns the CSV into docs/generalization.md and .png.

    python benchmarks/generalization.py --matrix all --jobs 2     # the full matrix, both cores (~1 h on 2 CPUs)
    python benchmarks/generalization.py --report                  # regenerate the doc and plot from the CSV
    python benchmarks/generalization.py --quick --csv /tmp/q.csv  # smoke test, < 1 min

Benchmark-only dependencies: pytorch-optimizer (SAM) and matplotlib (the plot).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from timm_mltp.distributed import average_gradients  # noqa: E402
from timm_mltp.engine import TrainArgs, Trainer  # noqa: E402
from timm_mltp.errors import MLTPConfigError  # noqa: E402
from timm_mltp.passes import frozen_running_stats as _frozen_running_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS_CSV = ROOT / "benchmarks" / "results" / "generalization.csv"
QUICK_CSV = ROOT / "output" / "generalization-quick.csv"
DOC = ROOT / "docs" / "generalization.md"
FULL_DATA = ROOT / "data" / "fashion-mnist-full"
# the IDX files: shared/ lies next to the checkout (also in CI's fresh clone), then the usual places
SOURCES = [ROOT.parent / "shared" / "data" / "fashion-mnist", Path("/work/shared/data/fashion-mnist"),
           Path("/usr/share/datasets/fashion-mnist")]

METHODS = ("none", "fo", "fc", "conv", "full", "sam")
MODELS = ("test_resnet", "test_convnext")      # a BatchNorm ResNet and a LayerNorm ConvNeXt, random init
SEEDS = (0, 1, 2)
EPOCHS = 4
TRAIN_SAMPLES = 20_000
SENSITIVITY_METHOD = "full"
GAMMAS = (0.25, 0.5, 0.75)
ALPHA_SCALES = (0.25, 1.0, 4.0)                # alpha = lr x alpha_scale; a factor 4 each way of the default
DEFAULT_GAMMA, DEFAULT_ALPHA_SCALE = 0.5, 1.0
BATCH_SIZE, LR = 64, 0.05                      # B per task: 128 samples per optimizer step
SAM_RHO = 0.05                                 # SAM's default radius (Foret et al. 2021)
QUICK = dict(methods=("none", "sam"), models=("test_convnext",), seeds=(0,), epochs=1, train_samples=256)

COLUMNS = ["device", "method", "model", "seed", "epochs", "train_samples", "samples_seen", "optimizer_steps",
           "wall_seconds", "final_top1", "best_top1", "test_loss", "final_train_loss", "mean_grad_cosine",
           "gamma", "alpha_scale", "batch_size", "lr"]
KEY_TYPES = {"device": str, "method": str, "model": str, "seed": int, "epochs": int, "train_samples": int,
             "gamma": float, "alpha_scale": float}


@dataclass(frozen=True)
class Run:
    method: str
    model: str
    seed: int
    epochs: int
    train_samples: int
    gamma: float = DEFAULT_GAMMA
    alpha_scale: float = DEFAULT_ALPHA_SCALE


# ---- SAM through the engine -----------------------------------------------------------------------

class SAMTrainer(Trainer):
    """Sharpness-aware minimisation with everything else of an engine run: the engine's (timm's) SGD is
    SAM's base optimizer, so the schedule, weight decay and checkpoints are the ones MLTP runs get."""

    def __init__(self, args: TrainArgs, rho: float = SAM_RHO):
        from pytorch_optimizer import SAM  # benchmark-only dependency: pip install pytorch-optimizer

        super().__init__(replace(args, variant="none"))  # the MLTP config is built but never used
        if self.accelerator.scaler is not None:
            raise MLTPConfigError("SAMTrainer has no fp16 gradient-scaler path; use mixed_precision='bf16' or 'no'")
        engine_optimizer = self.optimizer
        # SAM builds its base optimizer from a factory; hand it the engine's own, already scheduled one
        self.sam = SAM(engine_optimizer.param_groups, base_optimizer=lambda *_, **__: engine_optimizer, rho=rho)

    def per_sample_loss(self, batch) -> torch.Tensor:
        with self.accelerator.autocast():
            logits = self.module(batch["pixel_values"])
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none", label_smoothing=self.args.smoothing)

    def train_step(self, batch) -> dict | None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer.zero_grad(set_to_none=True)
        per_sample = self.per_sample_loss(batch)        # all 2B samples as one batch
        loss = per_sample.mean()
        if not math.isfinite(loss.item()):
            return None
        loss.backward()
        average_gradients(params)
        self.sam.first_step(zero_grad=True)             # climb to w + e(w), e = rho g / |g|
        with _frozen_running_stats(self.module):        # as the SAM reference: BN statistics from the pass at w only
            self.per_sample_loss(batch).mean().backward()
        average_gradients(params)
        if self.args.clip_grad:
            self.accelerator.clip_grad_norm_(params, self.args.clip_grad)
        self.sam.second_step()                          # back to w, then SGD with the gradient taken at w + e(w)
        self.num_updates += 1
        self.scheduler.step_update(num_updates=self.num_updates)
        loss_i, loss_j = per_sample.detach().view(2, -1).mean(1).tolist()
        # no gradient cosine: SAM never takes the two halves' gradients separately
        return {"loss": loss.item(), "loss_i": loss_i, "loss_j": loss_j, "grad_cosine": float("nan"), "alpha": 0.0}


# ---- data -----------------------------------------------------------------------------------------

def ensure_full_dataset() -> Path:
    """Convert the full Fashion-MNIST once (scripts/make_fashion_mnist.py --full), atomically: a killed
    conversion must not leave a folder that later runs take for complete."""
    if (FULL_DATA / "dataset_dict.json").is_file():
        return FULL_DATA
    source = next((d for d in SOURCES if (d / "train-images-idx3-ubyte.gz").is_file()), None)
    if source is None:
        sys.exit(f"Fashion-MNIST IDX files not found in {', '.join(map(str, SOURCES))}")
    spec = importlib.util.spec_from_file_location("make_fashion_mnist", ROOT / "scripts" / "make_fashion_mnist.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    partial = FULL_DATA.with_name(FULL_DATA.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"converting the full Fashion-MNIST from {source} into {FULL_DATA} (once)")
    maker.write_full(maker.find_source(str(source)), partial)
    partial.rename(FULL_DATA)
    return FULL_DATA


def train_split_size(dataset: Path) -> int:
    import datasets
    return datasets.load_from_disk(str(dataset))["train"].num_rows


# ---- the matrix -----------------------------------------------------------------------------------

def device_name(threads: int) -> str:
    """Part of every run's key: wall times compare only on one device and thread count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu, info = platform.processor() or platform.machine(), Path("/proc/cpuinfo")
    if info.is_file():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"cpu {cpu}, {threads} thread{'s' if threads > 1 else ''}"


def plan(matrix: str, methods, models, seeds, epochs: int, train_samples: int) -> list[Run]:
    """main: every method x model x seed at the default gamma and alpha; sensitivity: gamma x alpha_scale
    of one method on the first model and seed. The shared default cell is planned once."""
    runs = []
    if matrix in ("main", "all"):
        runs += [Run(m, model, s, epochs, train_samples) for model in models for s in seeds for m in methods]
    if matrix in ("sensitivity", "all"):
        runs += [Run(SENSITIVITY_METHOD, models[0], seeds[0], epochs, train_samples, g, a)
                 for g in GAMMAS for a in ALPHA_SCALES]
    return list(dict.fromkeys(runs))


def key(row: dict) -> tuple:
    return tuple(cast(row[k]) for k, cast in KEY_TYPES.items())


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def train_args(run: Run, dataset: Path | None, output: str) -> TrainArgs:
    # img_size 32: Fashion-MNIST's 28x28 upsampled; the models' own default (160) would cost 25x more.
    # Augmentation: RandomResizedCrop(scale 0.8-1) + hflip, the engine's; see docs/generalization.md.
    return TrainArgs(model=run.model, dataset=None if dataset is None else str(dataset), img_size=32,
                     max_train_samples=run.train_samples, scale=(0.8, 1.0), hflip=0.5, batch_size=BATCH_SIZE,
                     epochs=run.epochs, lr=LR, variant="none" if run.method == "sam" else run.method,
                     gamma=run.gamma, alpha_scale=run.alpha_scale, seed=run.seed, output=output,
                     experiment=f"{run.model}-{run.method}-s{run.seed}", progress=False, workers=0)


def execute(run: Run, dataset: Path | None, device: str, threads: int) -> dict:
    """Train one run in a throw-away output folder (the checkpoints are not needed) and make its CSV row."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="generalization-") as output:
        args = train_args(run, dataset, output)
        result = (SAMTrainer(args) if run.method == "sam" else Trainer(args)).fit()
    rows = result["rows"]
    cosines = [r["grad_cosine"] for r in rows if math.isfinite(r["grad_cosine"])]
    return {"device": device, **asdict(run),
            "samples_seen": result["optimizer_steps"] * 2 * BATCH_SIZE, "optimizer_steps": result["optimizer_steps"],
            "wall_seconds": round(result["wall_seconds"], 2), "final_top1": round(rows[-1]["eval_top1"], 3),
            "best_top1": round(result["best_top1"], 3), "test_loss": round(rows[-1]["eval_loss"], 5),
            "final_train_loss": round(rows[-1]["train_loss"], 5),
            "mean_grad_cosine": round(statistics.fmean(cosines), 5) if cosines else "",
            "batch_size": BATCH_SIZE, "lr": LR}


def _execute(job: tuple) -> dict:
    return execute(*job)


def run_matrix(runs: list[Run], csv_path: Path, dataset: Path | None, threads: int, jobs: int) -> None:
    device = device_name(threads)
    done = {key(r) for r in read_rows(csv_path)}
    pending = [r for r in runs if key({"device": device, **asdict(r)}) not in done]
    print(f"{len(runs)} runs planned, {len(runs) - len(pending)} already in {csv_path}, {len(pending)} to go ({device})")
    work = [(r, dataset, device, threads) for r in pending]
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(work) > 1:
            # whole runs in parallel, one writer (this process). spawn: forking a process that holds torch's
            # thread pools can hang. imap_unordered hands the next run to whichever worker is free.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(jobs))
            results = pool.imap_unordered(_execute, work)
        else:
            results = map(_execute, work)
        for row in results:
            append_row(csv_path, row)       # at once: a stopped matrix keeps every finished run
            print(f"done: {row['model']} {row['method']} seed {row['seed']}: top-1 {row['final_top1']}")


# ---- the report -----------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "") + f" (n={len(values)})"


def numeric(rows: list[dict]) -> list[dict]:
    """CSV strings to numbers; an empty cell (SAM's gradient cosine) becomes nan."""
    out = []
    for row in rows:
        typed = dict(row)
        for column in COLUMNS:
            if column not in ("device", "method", "model"):
                typed[column] = float(row[column]) if row[column] != "" else float("nan")
        out.append(typed)
    return out


def settings(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by what must match for runs to be compared: device, epochs, training samples."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["device"], int(row["epochs"]), int(row["train_samples"]))].append(row)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def method_order(rows: list[dict]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def main_cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(model, method) -> runs at the default gamma and alpha_scale, one per seed."""
    cells = defaultdict(list)
    for row in rows:
        if row["gamma"] == DEFAULT_GAMMA and row["alpha_scale"] == DEFAULT_ALPHA_SCALE:
            cells[row["model"], row["method"]].append(row)
    return cells


def paired_differences(cells, model: str, method: str, column: str = "final_top1") -> list[float]:
    """Per seed: method minus `none` on the same seed (same initialisation, subset and data order)."""
    baseline = {r["seed"]: r[column] for r in cells.get((model, "none"), [])}
    return [r[column] - baseline[r["seed"]] for r in cells.get((model, method), []) if r["seed"] in baseline]


def seconds_per_epoch(cells, model: str, method: str) -> float | None:
    """Mean wall seconds per epoch, training and evaluation."""
    runs = cells.get((model, method), [])
    return statistics.fmean(r["wall_seconds"] / r["epochs"] for r in runs) if runs else None


def cost_ratio(cells, model: str, method: str) -> float | None:
    """Seconds per epoch relative to `none` on the same model."""
    base, own = seconds_per_epoch(cells, model, "none"), seconds_per_epoch(cells, model, method)
    return own / base if base and own else None


def main_table(rows: list[dict]) -> list[str]:
    cells, lines = main_cells(rows), []
    lines += ["| model | method | final top-1 | best top-1 | test loss | final - none, per seed | "
              "cost per epoch vs none | grad cosine |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in sorted({m for m, _ in cells}):
        for method in method_order(rows):
            runs = cells.get((model, method))
            if not runs:
                continue
            diffs = paired_differences(cells, model, method) if method != "none" else []
            ratio, seconds = cost_ratio(cells, model, method), seconds_per_epoch(cells, model, method)
            cosines = [r["mean_grad_cosine"] for r in runs if math.isfinite(r["mean_grad_cosine"])]
            lines.append(f"| {model} | {method} | {fmt([r['final_top1'] for r in runs])} | "
                         f"{fmt([r['best_top1'] for r in runs])} | {fmt([r['test_loss'] for r in runs], 4)} | "
                         f"{fmt(diffs) if diffs else '-'} | {f'{ratio:.2f}x' if ratio else '-'} ({seconds:.1f} s) | "
                         f"{f'{statistics.fmean(cosines):.3f}' if cosines else '-'} |")
    return lines


def sensitivity_grids(rows: list[dict]) -> dict[tuple, dict[tuple, list[float]]]:
    """(model, method) -> {(gamma, alpha_scale): final top-1 values}, where more than one cell was run.
    Only seeds that every cell has count: the default cell also holds the main matrix's other seeds,
    and comparing a 3-seed mean with 1-seed cells would mix seed noise into the grid."""
    grids = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["method"] not in ("none", "sam"):  # gamma and alpha do nothing for these
            grids[row["model"], row["method"]][row["gamma"], row["alpha_scale"]][row["seed"]] = row["final_top1"]
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


def findings(rows: list[dict]) -> list[str]:
    """Plain statements computed from the numbers; no claim is written by hand."""
    cells, lines = main_cells(rows), []
    for model in sorted({m for m, _ in cells}):
        ranked = sorted(((statistics.fmean(r["final_top1"] for r in runs), method)
                         for (mod, method), runs in cells.items() if mod == model), reverse=True)
        lines.append(f"- **{model}**: highest mean final top-1: {ranked[0][1]} ({ranked[0][0]:.2f}); "
                     f"lowest: {ranked[-1][1]} ({ranked[-1][0]:.2f}).")
        for method in method_order(rows):
            diffs = paired_differences(cells, model, method) if method != "none" else []
            if not diffs:
                continue
            mean, std = mean_std(diffs)
            if std is None:
                verdict = "one seed only: no spread to compare it with"
            elif abs(mean) > std:
                verdict = f"the mean exceeds the seed-to-seed std ({std:.2f}): a consistent {'gain' if mean > 0 else 'loss'}"
            else:
                verdict = f"within the seed-to-seed std ({std:.2f}): not distinguishable from `none` at this size"
            ratio = cost_ratio(cells, model, method)
            lines.append(f"  - {method}: {mean:+.2f} points vs `none` over {len(diffs)} paired seed(s), {verdict}"
                         + (f"; costs {ratio:.2f}x `none` per epoch." if ratio else "."))
    for (model, method), grid in sensitivity_grids(rows).items():
        means = {cell: statistics.fmean(v) for cell, v in grid.items()}
        best, worst = max(means, key=means.get), min(means, key=means.get)
        seed_std = mean_std([r["final_top1"] for r in cells.get((model, method), [])])[1]
        spread = means[best] - means[worst]
        lines.append(f"- Sensitivity ({model}, {method}): top-1 ranges {spread:.2f} points over the grid, best at "
                     f"gamma {best[0]:g}, alpha_scale {best[1]:g} ({means[best]:.2f}), worst at gamma {worst[0]:g}, "
                     f"alpha_scale {worst[1]:g} ({means[worst]:.2f})"
                     + (f"; the seed-to-seed std at the default is {seed_std:.2f}, so the range is "
                        f"{'larger' if spread > seed_std else 'not larger'} than seed noise." if seed_std else "."))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cells, methods = main_cells(rows), method_order(rows)
    models = sorted({m for m, _ in cells})
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    markers = dict(zip(models, "osD^v<>"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(models), 1)
    for j, model in enumerate(models):
        for i, method in enumerate(methods):
            values = [r["final_top1"] for r in cells.get((model, method), [])]
            if not values:
                continue
            x = i + (j - (len(models) - 1) / 2) * width
            left.scatter([x] * len(values), values, color=colors[method], marker=markers[model], alpha=0.5, s=20)
            mean, std = mean_std(values)
            left.errorbar(x, mean, yerr=std or 0, color=colors[method], marker=markers[model], capsize=4, ms=8,
                          label=model if i == 0 else None)
    left.set_xticks(range(len(methods)), methods)
    left.set_ylabel("final test top-1 (%)")
    left.set_title("test top-1 per method (points: seeds; bars: mean ± std)")
    left.legend(title="model", fontsize=8)
    for (model, method), runs in cells.items():
        minutes, top1 = [r["wall_seconds"] / 60 for r in runs], [r["final_top1"] for r in runs]
        right.scatter(minutes, top1, color=colors[method], marker=markers[model], alpha=0.4, s=20)
        right.scatter(statistics.fmean(minutes), statistics.fmean(top1), color=colors[method],
                      marker=markers[model], s=80, edgecolors="black")
    for method in methods:
        right.scatter([], [], color=colors[method], label=method)
    for model in models:
        right.scatter([], [], color="gray", marker=markers[model], label=model)
    right.set_xlabel("wall time of the run (minutes)")
    right.set_ylabel("final test top-1 (%)")
    right.set_title("accuracy vs wall time (large: mean over seeds)")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


SETUP = """\
Fashion-MNIST (60,000 train / 10,000 test, 28x28 grayscale upsampled to 32x32, or the subset named below),
models from timm with random initialisation, trained through `timm_mltp.engine`: SGD (momentum 0.9,
weight decay 5e-4, timm's parameter groups), lr {lr}, cosine schedule without warmup, B = {batch} per task,
so every optimizer step of every method consumes {pair} samples. Augmentation: RandomResizedCrop with
area scale 0.8-1 and aspect 3/4-4/3, plus horizontal flip (p 0.5). The usual CIFAR-style random crop with
4-pixel padding is not something timm's `create_transform` offers, and the engine builds its transforms
with it, so the engine's crop is used instead. MLTP variants at gamma {gamma}, alpha = lr x {alpha};
`none` is standard training on both batches; SAM is pytorch-optimizer's `SAM` (rho {rho}) around the same
SGD, on one batch of {pair} taken twice (BatchNorm statistics from the first pass only). Top-1 is on the
full test split after the last epoch (final) and the best epoch (best). Cost per epoch includes evaluation.
"""


def report(csv_path: Path, doc: Path) -> None:
    rows = numeric(read_rows(csv_path))
    if not rows:
        sys.exit(f"{csv_path} has no runs yet; run the matrix first")
    png = doc.with_suffix(".png")
    lines = ["# Generalization: MLTP vs standard training vs SAM", "",
             f"Generated by `python benchmarks/generalization.py --report` from `{csv_path.name}` "
             f"({len(rows)} runs); every number below is computed from that file.", "",
             SETUP.format(lr=LR, batch=BATCH_SIZE, pair=2 * BATCH_SIZE, gamma=DEFAULT_GAMMA,
                          alpha=DEFAULT_ALPHA_SCALE, rho=SAM_RHO), f"![test top-1 and wall time]({png.name})", "",
             "The plot shows the first setting below, at the default gamma and alpha_scale.", ""]
    for (device, epochs, train_samples), group in settings(rows).items():
        lines += [f"## {device}: {epochs} epoch(s) on {train_samples:,} training samples", "",
                  "Mean ± std over seeds. `final - none` pairs each seed with the `none` run of the same "
                  "seed (same initialisation, subset and data order).", ""]
        lines += main_table(group) + [""]
        for (model, method), grid in sensitivity_grids(group).items():
            lines += [f"### Sensitivity: {method} on {model}, final top-1", ""] + sensitivity_table(grid) + [""]
        lines += ["### What the numbers say", ""] + findings(group) + [""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    plot(next(iter(settings(rows).values())), png)   # the setting with the most runs
    print(f"wrote {doc} and {png}")


# ---- command line ---------------------------------------------------------------------------------

def csv_list(cast):
    return lambda text: tuple(cast(x) for x in text.split(",") if x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke matrix: 2 methods, 1 tiny model, 1 seed, 256 samples "
                                                        "of the shipped subset, 1 epoch")
    p.add_argument("--matrix", choices=["main", "sensitivity", "all"], default="all")
    p.add_argument("--methods", type=csv_list(str), default=METHODS, help=f"default: {','.join(METHODS)}")
    p.add_argument("--models", type=csv_list(str), default=MODELS, help=f"default: {','.join(MODELS)}")
    p.add_argument("--seeds", type=csv_list(int), default=SEEDS, help=f"default: {','.join(map(str, SEEDS))}")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="default: %(default)s")
    p.add_argument("--train-samples", type=int, default=TRAIN_SAMPLES, help="random subset of the 60k training "
                                                                            "images, one per seed (default: %(default)s)")
    p.add_argument("--csv", type=Path, default=None, help=f"results file (default: {RESULTS_CSV.relative_to(ROOT)}; "
                                                          f"with --quick: {QUICK_CSV.relative_to(ROOT)})")
    p.add_argument("--doc", type=Path, default=DOC, help="report file; the plot goes beside it as .png")
    p.add_argument("--report", action="store_true", help="only regenerate the doc and plot from the CSV")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default: %(default)s)")
    args = p.parse_args(argv)
    csv_path = args.csv or (QUICK_CSV if args.quick else RESULTS_CSV)
    if args.report:
        report(csv_path, args.doc)
        return
    if args.quick:
        # the shipped 10k/2k subset: no conversion, a short evaluation
        dataset, q = None, QUICK
        runs = plan("main", q["methods"], q["models"], q["seeds"], q["epochs"], q["train_samples"])
    else:
        dataset = ensure_full_dataset()
        train_samples = min(args.train_samples, train_split_size(dataset))
        runs = plan(args.matrix, args.methods, args.models, args.seeds, args.epochs, train_samples)
    run_matrix(runs, csv_path, dataset, args.threads, args.jobs)


if __name__ == "__main__":
    main()
