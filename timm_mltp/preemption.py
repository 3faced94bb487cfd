"""Preemption: SIGTERM (what schedulers and `kill` send) and SIGUSR1 (SLURM's `--signal=USR1@SECONDS`) end a run
after the optimizer step in progress, with a checkpoint to resume from, instead of at once.

    with PreemptionSignal() as signalled:          # the handlers, for the duration of the loop
        for batch in loader:
            step(batch)
            if any_process(signalled.received is not None, device):   # every process stops after the same step
                save(); raise Preempted(...)       # the recipe exits with PREEMPTED_EXIT_CODE

The recipe's loop (engine.py) and `PreemptionCallback` (trainer.py, for MLTPTrainer and any Trainer) both use it.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading

import torch
import torch.distributed as dist

# sysexits' EX_TEMPFAIL, "a temporary failure; the user is invited to retry": the run saved its state and
# stopped; run the same command with --resume. Distinct from 0 (done), 1 (a crash) and 2 (bad input).
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a preemption signal after saving `checkpoint`."""

    def __init__(self, message: str, checkpoint):
        super().__init__(message)
        self.checkpoint = checkpoint


class PreemptionSignal:
    """While active (a context manager), SIGTERM and SIGUSR1 only set `received` (the first signal's name);
    the loop decides when to stop. The previous handlers come back on exit. Python runs signal handlers in the
    main thread only, so in another thread this does nothing."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> PreemptionSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def ignore_in_loader_worker(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`. A scheduler signals every process of a job, and torch's loader workers
    would die of SIGTERM or SIGUSR1, failing the step in progress; here they ignore both, except a SIGTERM sent
    by the main process itself: the DataLoader (and multiprocessing at exit) ends workers that way, and a worker
    that ignored it would be waited for forever. A signal handler cannot tell the sender, `sigwaitinfo` can."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):   # not Linux: SIGTERM keeps torch's handling
        return
    main_process = (multiprocessing.parent_process() or multiprocessing.current_process()).pid
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})   # threads started from here on inherit it

    def wait_for_the_main_process():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_process:
            pass
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait_for_the_main_process, daemon=True).start()


def _shielded_init(worker_init_fn, worker_id: int) -> None:
    ignore_in_loader_worker(worker_id)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def shield_loader_workers(loader) -> None:
    """Give a built DataLoader's workers `ignore_in_loader_worker`, before its own `worker_init_fn` (the
    Trainer's seeding). A DataLoader reads `worker_init_fn` each time it starts its workers; a partial of
    module-level functions survives the `spawn` start method. Accelerate's prepared loader iterates the
    DataLoader it wraps (`base_dataloader`): that one gets it."""
    loader = getattr(loader, "base_dataloader", loader)
    init = getattr(loader, "worker_init_fn", None)
    shielded = isinstance(init, functools.partial) and init.func is _shielded_init   # a cached loader, again
    if getattr(loader, "num_workers", 0) > 0 and not shielded:
        loader.worker_init_fn = functools.partial(_shielded_init, init)


def any_process(flag: bool, device) -> bool:
    """Whether `flag` is set on any process (itself in a single process): one small all-reduce, which every
    process must call at the same point."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


__all__ = ["PREEMPTED_EXIT_CODE", "PREEMPTION_SIGNALS", "Preempted", "PreemptionSignal", "any_process",
           "ignore_in_loader_worker", "shield_loader_workers"]
