"""Checkpoint files of the recipe: timm's layout, written atomically, each one enough to resume exactly.

    last.pth.tar              every epoch end (and every --checkpoint-interval optimizer steps)
    checkpoint-EPOCH.pth.tar  the --checkpoint-hist best epochs by --eval-metric
    model_best.pth.tar        the best epoch
    recovery-EPOCH-STEP.pth.tar  every --recovery-interval optimizer steps (the latest one is kept)

timm loads every one of them (`timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))`
takes `state_dict_ema` when the run kept an EMA, as timm's own loading does).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _duplicate(src: Path, dst: Path) -> None:
    """`dst` holds what `src` holds: a hard link where the file system allows one (no copy), else a copy."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def rng_state() -> dict:
    """Every random state the run draws from, in types `torch.load(weights_only=True)` accepts (timm loads so)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointSaver:
    """timm.utils.CheckpointSaver's files and ranking, for states that hold a whole run.

    timm's saver writes the model, optimizer and EMA; an exact resume here also needs the scheduler, the
    random states, the epoch's position and the inner step's memory, so the caller gives the state and this
    class only decides the files. Its own ranking travels in every checkpoint (`saver`), so a resumed run
    keeps and prunes the same files as an uninterrupted one.
    """

    def __init__(self, directory: Path, max_history: int = 10, decreasing: bool = False):
        self.directory, self.max_history, self.decreasing = Path(directory), max_history, decreasing
        self.history: list[tuple[int, float]] = []   # (epoch, metric) of the kept checkpoints, best first
        self.best_epoch: int | None = None
        self.best_metric: float | None = None
        self.recovery: str | None = None              # the latest recovery file's name

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def _path(self, epoch: int) -> Path:
        return self.directory / f"checkpoint-{epoch}.pth.tar"

    def save_last(self, state: dict) -> None:
        atomic_save({**state, "saver": self.state_dict()}, self.directory / "last.pth.tar")

    def save_checkpoint(self, state: dict, epoch: int, metric: float) -> bool:
        """At an epoch end: `last`, and `checkpoint-EPOCH` and `model_best` where `metric` earns them.
        Returns True when this epoch is the best so far."""
        kept = len(self.history) < self.max_history or self._better(metric, self.history[-1][1])
        best = self.best_metric is None or self._better(metric, self.best_metric)
        dropped = []
        if kept:   # ties keep the earlier epoch (a stable sort)
            ranked = sorted(self.history + [(epoch, metric)], key=lambda e: e[1], reverse=not self.decreasing)
            self.history, dropped = ranked[:self.max_history], ranked[self.max_history:]
        if best:
            self.best_metric, self.best_epoch = metric, epoch
        self.save_last({**state, "metric": metric})
        last = self.directory / "last.pth.tar"
        if kept:
            _duplicate(last, self._path(epoch))
        for old_epoch, _ in dropped:
            self._path(old_epoch).unlink(missing_ok=True)
        if best:
            _duplicate(last, self.directory / "model_best.pth.tar")
        return best

    def save_recovery(self, state: dict, epoch: int, step: int) -> None:
        name = f"recovery-{epoch}-{step}.pth.tar"
        atomic_save({**state, "saver": {**self.state_dict(), "recovery": name}}, self.directory / name)
        if self.recovery and self.recovery != name:
            (self.directory / self.recovery).unlink(missing_ok=True)
        self.recovery = name

    def state_dict(self) -> dict:
        return {"history": list(self.history), "best_epoch": self.best_epoch, "best_metric": self.best_metric,
                "recovery": self.recovery}

    def load_state_dict(self, state: dict) -> None:
        """Resume the ranking; checkpoints deleted since (or never written: a kill between files) are dropped."""
        self.history = [(e, m) for e, m in state["history"] if self._path(e).is_file()]
        self.best_epoch, self.best_metric, self.recovery = state["best_epoch"], state["best_metric"], state["recovery"]


__all__ = ["CheckpointSaver", "atomic_save", "rng_state", "set_rng_state"]
