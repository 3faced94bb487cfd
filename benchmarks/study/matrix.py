"""The matrix: which runs a setting plans (equal-compute baselines included), and running the missing ones, a
process each, into the CSV, within a time budget."""
from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import platform
import signal
import statistics
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import timm
import torch

from timm_mltp.errors import MLTPConfigError
from timm_mltp.selection import select_parameters

from .paths import execute
from .results import COLUMNS, append_row, code_state, key, read_rows, superseded
from .settings import (ALPHA_SCALES, BASELINES, DEFAULT_ALPHA_SCALE, DEFAULT_CURVATURE_FRACTION, DEFAULT_GAMMA, GAMMAS,
                       SENSITIVITY_METHOD, SETTINGS, Run, equal_compute_epochs)

ROOT = Path(__file__).resolve().parents[2]
MIN_COST_SEEDS = 2     # paired seeds of a method and `none` before their cost ratio is taken (and then kept)


def device_name(threads: int, jobs: int = 1) -> str:
    """Part of every run's key: wall times compare only on one device and thread count, and on a GPU only at one
    number of runs sharing it."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0) + (f", {jobs} runs at once" if jobs > 1 else "")
    cpu, info = platform.processor() or platform.machine(), Path("/proc/cpuinfo")
    if info.is_file():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"cpu {cpu}, {threads} thread{'s' if threads > 1 else ''}"


@functools.cache
def has_more_than_head(model_name: str) -> bool:
    """Whether `fc` selects more than the classifier: otherwise it is the `head` preset, not a variant to study."""
    model = timm.create_model(model_name, num_classes=10)
    try:
        return set(select_parameters(model, "fc")) > set(select_parameters(model, "head"))
    except MLTPConfigError:   # no linear module at all
        return False


def plan(setting: str, matrix: str, methods, models, seeds, alpha_rule: str, paths=None, epochs: int | None = None,
         train_samples=None, curvature_fraction: float = DEFAULT_CURVATURE_FRACTION) -> list[Run]:
    """main: every path x training-set size x model x seed x method; sensitivity: gamma x alpha_scale of one
    method on the first model, seed and size, through the engine. A cell planned twice is planned once.
    curvature_fraction (rho) applies to the MLTP methods; none and sam take no H_i v and always have rho 1."""
    s = SETTINGS[setting]
    epochs, sizes, paths = epochs or s.epochs, train_samples or s.train_samples, paths or s.paths

    def run(path, method, model, seed, n, gamma=DEFAULT_GAMMA, alpha_scale=DEFAULT_ALPHA_SCALE):
        rule = "-" if method in BASELINES else alpha_rule
        rho = DEFAULT_CURVATURE_FRACTION if method in BASELINES else curvature_fraction
        return Run(setting, path, method, model, seed, epochs, n, rule, gamma, alpha_scale, rho)

    runs = []
    if matrix in ("main", "all"):
        runs += [run(path, method, model, seed, n) for path in paths for n in sizes for model in models
                 for seed in seeds for method in methods if method != "fc" or has_more_than_head(model)]
    if matrix in ("sensitivity", "all"):
        runs += [run("engine", SENSITIVITY_METHOD, models[0], seeds[0], sizes[0], g, a)
                 for g in GAMMAS for a in ALPHA_SCALES]
    return list(dict.fromkeys(runs))


def run_key(run: Run, device: str) -> tuple:
    return key({"device": device, **asdict(run)})


def same_group(row: dict, run: Run, device: str) -> bool:
    """Whether a CSV row ran in the equal-epoch group of `run`: device, setting, path, size, epochs, default
    gamma and alpha_scale, no equal-compute run."""
    return (row["device"] == device and row["setting"] == run.setting and row["path"] == run.path
            and int(row["train_samples"]) == run.train_samples and int(row["epochs"]) == run.epochs
            and not row["compute_of"] and float(row["gamma"]) == DEFAULT_GAMMA
            and float(row["alpha_scale"]) == DEFAULT_ALPHA_SCALE)


def measured_cost_ratio(rows: list[dict], device: str, method_run: Run) -> float | None:
    """The wall time of `method_run`'s cell (same group, model, rule and rho) over `none`'s, summed over the seeds
    both have: the measured compute the equal-compute baseline gets (issue 24; the paired runs' wall time, which
    holds training and the evaluation both have, rather than step_cost.py's per-step ratio, which leaves out data
    loading). Only rows that record their commit count: the rows from before issue 24 ran beside other jobs on
    a shared machine, and their wall times vary up to 4x between seeds of one cell. None until MIN_COST_SEEDS
    seeds of each are in."""
    walls = {"none": {}, "method": {}}
    for row in rows:
        if not same_group(row, method_run, device) or row["model"] != method_run.model or not row["commit"]:
            continue
        rho = float(row["curvature_fraction"])
        if row["method"] == "none" and rho == DEFAULT_CURVATURE_FRACTION:
            walls["none"][int(row["seed"])] = float(row["wall_seconds"])
        elif (row["method"] == method_run.method and row["alpha_rule"] == method_run.alpha_rule
              and rho == method_run.curvature_fraction):
            walls["method"][int(row["seed"])] = float(row["wall_seconds"])
    seeds = set(walls["none"]) & set(walls["method"])
    if len(seeds) < MIN_COST_SEEDS:
        return None
    return round(sum(walls["method"][s] for s in seeds) / sum(walls["none"][s] for s in seeds), 3)


class Planner:
    """The runs to do, planned again from the CSV after each finished run: the base matrix, and for each method
    in `equal_compute` a `none` run per (path, size, model, seed) at that method's measured compute, once its
    cost ratio can be measured. A ratio once taken is kept (from the CSV's equal-compute rows, or from this
    session), so every seed's baseline of a cell has the same epochs, whatever seeds come in later."""

    def __init__(self, runs: list[Run], equal_compute=(), device: str = ""):
        self.runs, self.equal_compute, self.device = list(runs), tuple(equal_compute), device
        self.decided: dict[tuple, tuple[int, float]] = {}

    def cell(self, run: Run, method: str) -> tuple:
        return (run.setting, run.path, run.train_samples, run.epochs, run.model, method)

    def decide(self, rows: list[dict], run: Run, method: str) -> tuple[int, float] | None:
        cell = self.cell(run, method)
        if cell not in self.decided:
            earlier = [r for r in rows if r["compute_of"] == method and r["device"] == self.device
                       and (r["setting"], r["path"], int(r["train_samples"]), int(r["base_epochs"]), r["model"])
                       == cell[:5] and r["cost_ratio"] != ""]
            if earlier:
                self.decided[cell] = int(earlier[0]["epochs"]), float(earlier[0]["cost_ratio"])
            else:
                method_run = next((r for r in self.runs if self.cell(r, r.method) == cell), None)
                ratio = measured_cost_ratio(rows, self.device, method_run) if method_run else None
                if ratio is None:
                    return None
                self.decided[cell] = equal_compute_epochs(run.epochs, ratio), ratio
        return self.decided[cell]

    def __call__(self, rows: list[dict]) -> list[Run]:
        planned = list(self.runs)
        for run in self.runs:
            if run.method != "none" or run.compute_of:
                continue
            for method in self.equal_compute:
                decided = self.decide(rows, run, method)
                if decided is not None:
                    planned.append(replace(run, epochs=decided[0], compute_of=method, base_epochs=run.epochs,
                                           cost_ratio=decided[1]))
        return planned


def _execute(job: tuple) -> dict:
    return execute(*job)


def estimated_seconds(run: Run, rows: list[dict], device: str) -> float | None:
    """Wall seconds a run will take, from this device's finished runs of its model, method and path: the mean
    per epoch times its epochs (an equal-compute run: `none`'s per epoch). None: nothing to go by yet."""
    per_epoch = [float(r["wall_seconds"]) / int(r["epochs"]) for r in rows
                 if r["device"] == device and r["setting"] == run.setting and r["path"] == run.path
                 and r["model"] == run.model and r["method"] == run.method
                 and int(r["train_samples"]) == run.train_samples]
    return statistics.fmean(per_epoch) * run.epochs if per_epoch else None


def priority(run: Run) -> tuple:
    """Seed by seed, so that a stopped matrix leaves whole seeds (pairs); within a seed the longest runs first."""
    return run.seed, -run.epochs, run.setting, run.model, run.method


class InlineExecutor(concurrent.futures.Executor):
    """jobs = 1: each run in this process, as it is submitted."""

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except Exception as error:  # noqa: BLE001 (reported with the run, the matrix goes on)
            future.set_exception(error)
        return future


def run_matrix(runs, csv_path: Path, dataset: Path | None, threads: int, jobs: int, budget: float | None = None,
               equal_compute=()) -> int:
    """Run what `runs` (a list, or a Planner) plans and the CSV lacks, `jobs` at a time. budget: seconds from now
    after which no run is still going; a run is only started when its estimate (from finished runs) fits, so a
    stopped matrix keeps every finished row and the next call continues it. A run that fails is reported and
    left out; the others go on. Returns how many failed."""
    start, device = time.time(), device_name(threads, jobs)
    commit, clean = code_state(ROOT)
    planner = runs if callable(runs) else Planner(runs, equal_compute, device)
    planner.device = device
    rows = read_rows(csv_path)
    done = {key(r) for r in rows if not superseded(r)}     # a row the code no longer makes is run again
    first = planner(rows)
    todo = [r for r in first if run_key(r, device) not in done]
    print(f"{len(first)} runs planned, {len(first) - len(todo)} already in {csv_path}, {len(todo)} to go ({device}"
          f"{', equal-compute runs follow their cost ratios' if planner.equal_compute else ''})", flush=True)
    # spawn: forking a process that holds torch's thread pools (or CUDA) can hang
    executor = (concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
                if jobs > 1 else InlineExecutor())
    running, skipped, failed = {}, set(), set()

    def stop(signum, frame):   # `timeout` (device_study.sh): end the runs in flight too, or they hold the GPU
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            process.kill()
        raise SystemExit(f"stopped by signal {signum}; the finished runs are in {csv_path}")

    previous = signal.signal(signal.SIGTERM, stop)
    with executor:
        while True:
            busy = set(running.values())
            pending = sorted((r for r in planner(rows) if run_key(r, device) not in done and r not in busy
                              and r not in skipped and r not in failed), key=priority)
            for run in pending:
                if len(running) >= jobs:
                    break
                if budget is not None:
                    estimate, left = estimated_seconds(run, rows, device), budget - (time.time() - start)
                    if (estimate is None and left < budget / 2) or (estimate is not None and 1.15 * estimate > left):
                        skipped.add(run)   # would not finish in time
                        continue
                running[executor.submit(_execute, (run, dataset, device, threads))] = run
            if not running:
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                try:
                    row = future.result()
                except Exception:  # noqa: BLE001
                    failed.add(run)
                    print(f"FAILED: {run}\n{traceback.format_exc()}", flush=True)
                    continue
                row |= {"commit": commit, "tree_clean": clean}
                append_row(csv_path, row)       # at once: a stopped matrix keeps every finished run
                rows.append({c: "" if row.get(c) is None else str(row[c]) for c in COLUMNS})   # as read back
                done.add(key(row))
                extra = f" (compute of {run.compute_of}: {run.epochs} epochs)" if run.compute_of else ""
                print(f"done: {row['setting']} {row['path']} {row['model']} {row['method']}{extra} seed {row['seed']}: "
                      f"top-1 {row['final_top1']}, train loss {row['final_train_loss']}, {row['wall_seconds']} s "
                      f"[{time.time() - start:.0f} s]", flush=True)
    signal.signal(signal.SIGTERM, previous)
    if skipped:
        print(f"stopped before the budget: {len(skipped)} run(s) left for the next call", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed (above)", flush=True)
    return len(failed)
