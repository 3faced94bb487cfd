"""Checkpoint files of the recipe: timm's layout, written atomically, each one enough to resume exactly.

    last.pth.tar              every epoch end (and every --checkpoint-interval optimizer steps)
    checkpoint-EPOCH.pth.tar  the --checkpoint-hist best epochs by --eval-metric
    model_best.pth.tar        the best epoch
    recovery-EPOCH-STEP.pth.tar  every --recovery-interval optimizer steps (the latest one is kept)

timm loads every one of them (`timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))`
takes `state_dict_ema` when the run kept an EMA, as timm's own loading does).

Loading reads tensors and plain Python types only (`torch.load(weights_only=True)`): unpickling anything else
can run code from the file. A file that needs more is refused in one line naming the opt-in (`--trust-checkpoint`).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import timm
import torch

from .errors import MLTPConfigError

TRUST_FLAG = "--trust-checkpoint"


@contextlib.contextmanager
def _replacing(path: Path):
    """Yield a temporary path beside `path` to write, then rename it over `path`: a kill or a full disk never
    leaves half a checkpoint, and the previous file stays as it was. A failed write (ENOSPC, EIO, a quota) is
    a one-line error naming the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        raise MLTPConfigError(f"could not write {path} ({e.strerror or e}); the previous {path.name}, if any, is "
                              f"intact: free space in {path.parent} (or give another --output) and --resume the "
                              f"last checkpoint") from e


def atomic_save(obj, path: Path) -> None:
    """torch.save through a Python file object, so that a failed write raises OSError (torch's own file writer
    raises RuntimeError) and is flushed to disk before the rename."""
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _duplicate(src: Path, dst: Path) -> None:
    """`dst` holds what `src` holds: a hard link where the file system allows one (no copy), else a copy."""
    with _replacing(dst) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)


@contextlib.contextmanager
def refusing_pickle(path, what: str, opt_in: str | None = TRUST_FLAG):
    """A `weights_only` load that met a global it does not allow (timm re-raises it as a RuntimeError) becomes
    a one-line error naming the file, what it holds and the opt-in (`opt_in`, None: there is none)."""
    try:
        yield
    except (pickle.UnpicklingError, RuntimeError) as e:
        refusal = e if isinstance(e, pickle.UnpicklingError) else e.__cause__
        if not isinstance(refusal, pickle.UnpicklingError):
            raise
        try:
            held = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:   # not a zip checkpoint: torch cannot list them
            held = ""
        how = f"pass {opt_in} if you trust this file" if opt_in else "resume from a checkpoint you wrote"
        raise MLTPConfigError(f"{what} {str(path)!r} holds Python objects beyond tensors and plain types"
                              f"{f' ({held})' if held else ''}, and unpickling them can run code from the file, "
                              f"so it was not loaded; {how}") from e


def load_checkpoint_file(path, what: str = "--resume", trust: bool = False) -> dict:
    """A whole checkpoint (this recipe's), tensors and plain types only unless `trust`."""
    with refusing_pickle(path, what):
        return torch.load(path, map_location="cpu", weights_only=not trust)


def load_weights(path, what: str, trust: bool = False) -> dict:
    """A model's weights from any file timm loads (EMA weights preferred, safetensors by extension), tensors and
    plain types only unless `trust`."""
    with refusing_pickle(path, what):
        return timm.models.load_state_dict(path, weights_only=not trust)


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


__all__ = ["CheckpointSaver", "atomic_save", "load_checkpoint_file", "load_weights", "refusing_pickle", "rng_state",
           "set_rng_state", "TRUST_FLAG"]
