"""The matrix: which runs a setting plans, and running the missing ones, a process each, into the CSV."""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import platform
from dataclasses import asdict
from pathlib import Path

import timm
import torch

from timm_mltp.errors import MLTPConfigError
from timm_mltp.selection import select_parameters

from .paths import execute
from .results import append_row, key, read_rows
from .settings import (ALPHA_SCALES, BASELINES, DEFAULT_ALPHA_SCALE, DEFAULT_CURVATURE_FRACTION, DEFAULT_GAMMA, GAMMAS,
                       SENSITIVITY_METHOD, SETTINGS, Run)


def device_name(threads: int) -> str:
    """Part of every run's key: wall times compare only on one device and thread count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
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
            print(f"done: {row['setting']} {row['path']} {row['model']} {row['method']} seed {row['seed']}: "
                  f"top-1 {row['final_top1']}")
