"""Several processes under torchrun, with preemption and exit codes a job script can act on.

    python -m timm_mltp.launch --nproc_per_node 8 recipes/train.py --model resnet50 ...

is `torchrun` with three differences, each for schedulers such as SLURM:
- SIGUSR1 (`#SBATCH --signal=B:USR1@120`) is forwarded to every worker, as SIGTERM is: plain torchrun dies of
  it (it forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT only, unless given `--signals-to-handle`);
- workers get `--shutdown-timeout` 120 s, not 30, to finish the step in progress and save before SIGKILL;
- the launcher exits with 75 (PREEMPTED_EXIT_CODE) when every worker on this node exited with 75: torchrun
  itself exits 1 whenever a worker exited non-zero or it was signalled, so a job script cannot tell "saved,
  requeue me" from a crash by its code. Workers report their code through `record_exit_code` (the recipe does).

Any other exit keeps torchrun's code. torchrun's options pass through unchanged.
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .distributed import leave_process_group
from .preemption import PREEMPTED_EXIT_CODE

EXIT_DIR_VARIABLE = "TIMM_MLTP_EXIT_DIR"   # where workers write their exit codes, one file per rank
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 120


def record_exit_code(code: int) -> None:
    """A worker's exit code, for `python -m timm_mltp.launch` (nothing outside it). Call just before exiting."""
    folder = os.environ.get(EXIT_DIR_VARIABLE)
    if folder:
        Path(folder, f"rank-{os.environ.get('RANK', '0')}").write_text(str(code))


def end_process(code: int) -> None:
    """The last thing a script's process does, whatever happened: leave the process group (a process that exits
    inside one can abort at exit, and its peers learn of a failure only when its connections close) and record
    `code`. Under a launcher, termination signals are ignored from here on: the launcher sends SIGTERM to every
    worker once one has exited non-zero, and this process, about to exit with its own code (2: bad input, 75:
    preempted), would otherwise be reported as killed by it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    leave_process_group()
    # What still holds the group (a DDP-wrapped model holds it and gloo's threads) is freed now, while the
    # interpreter is whole: freed during its shutdown, gloo's threads can abort the process (SIGABRT,
    # "terminate called without an active exception") after the run has ended well.
    gc.collect()
    record_exit_code(code)


def _given(argv: list[str], option: str) -> bool:
    """Whether torchrun's `option` (dashes or underscores, `--x v` or `--x=v`) is in the launcher's part of argv."""
    names = {option, "--" + option[2:].replace("-", "_")}
    return any(arg.split("=", 1)[0] in names for arg in argv)


def torchrun_command(argv: list[str]) -> list[str]:
    """torchrun with SIGUSR1 forwarded and a longer shutdown timeout, unless the command line sets them."""
    extra = []
    if not _given(argv, "--signals-to-handle"):
        extra += ["--signals-to-handle", SIGNALS_TO_HANDLE]
    if not _given(argv, "--shutdown-timeout"):
        extra += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    return [sys.executable, "-m", "torch.distributed.run", *extra, *argv]


def exit_code(torchrun_code: int, worker_codes: list[int]) -> int:
    """75 when every worker that reported was preempted (and some did); else torchrun's own code."""
    if torchrun_code != 0 and worker_codes and all(c == PREEMPTED_EXIT_CODE for c in worker_codes):
        return PREEMPTED_EXIT_CODE
    return torchrun_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="timm-mltp-exit-") as folder:
        launcher = subprocess.Popen(torchrun_command(argv), env={**os.environ, EXIT_DIR_VARIABLE: folder})
        forwarded = []

        def forward_once(signum, frame):
            # torchrun passes it on to its workers; a second one would interrupt torchrun while it waits for them
            if not forwarded:
                forwarded.append(signum)
                launcher.send_signal(signum)
        for sig in FORWARDED:
            signal.signal(sig, forward_once)
        code = launcher.wait()
        workers = [int(p.read_text()) for p in sorted(Path(folder).glob("rank-*"))]
    return exit_code(code, workers)


if __name__ == "__main__":
    sys.exit(main())
