"""Jobs of several processes (docs/reliability.md, Exit codes): one failing process ends the job promptly with its
reason and the previous checkpoint intact; SIGUSR1 and SIGTERM sent to the launcher reach every worker, which
saves and exits 75, and `python -m timm_mltp.launch` exits 75 too, so a job script can requeue."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_recipe import ENV, QUICK, ROOT
from test_reliability import assert_same_run, wait_for_line
from timm_mltp.launch import EXIT_DIR_VARIABLE, SHUTDOWN_TIMEOUT_S, SIGNALS_TO_HANDLE, exit_code, torchrun_command
from timm_mltp.preemption import PREEMPTED_EXIT_CODE

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LAUNCH = [sys.executable, "-m", "timm_mltp.launch", "--standalone", "--nproc_per_node", "2"]
RECIPE = str(ROOT / "recipes" / "train.py")
TWO = QUICK + ["--max-train-samples", "512", "--log-interval", "1"]   # 8 steps on each process


def worker_codes(stderr: str) -> dict[int, int]:
    """Each failed worker's exit code, from torchrun's failure report."""
    found = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", stderr)
    return {int(rank): int(code) for rank, code in found}


@pytest.mark.parametrize("fault", ["disk", "step"])
def test_one_failing_process_ends_the_job_with_its_reason(tmp_path, fault):
    """disk: process 0 cannot write its second checkpoint; step: process 1 raises in its fifth step. Both
    processes are gone within seconds, each with a non-zero code, and the checkpoint of step 2 loads."""
    worker = str(Path(__file__).with_name("failing_worker.py"))
    start = time.time()
    done = subprocess.run(TORCHRUN + [worker, fault] + TWO + ["--checkpoint-interval", "2", "--experiment", "f",
                                                               "--output", str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    took = time.time() - start
    codes = worker_codes(done.stderr)
    assert done.returncode != 0 and set(codes) == {0, 1} and 0 not in codes.values(), done.stderr[-3000:]
    assert took < 60, f"the job took {took:.0f} s to end"          # startup ~10 s; the fault comes at step 4 or 5
    last = tmp_path / "f" / "last.pth.tar"
    if fault == "disk":
        assert codes[0] == 2
        reason = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert reason == [f"error: could not write {last} (No space left on device); the previous last.pth.tar, "
                          f"if any, is intact: free space in {last.parent} (or give another --output) and --resume "
                          f"the last checkpoint"]
    else:
        assert codes[1] == 1 and "RuntimeError: injected: a step failed on process 1" in done.stderr
    assert torch.load(last, weights_only=True)["num_updates"] in (2, 4)   # written before the fault, whole


def test_the_launcher_passes_torchrun_options_through_and_adds_what_schedulers_need():
    assert torchrun_command(["--nproc_per_node", "2", "train.py"])[3:] == [
        "--signals-to-handle", SIGNALS_TO_HANDLE, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
        "--nproc_per_node", "2", "train.py"]
    given = ["--signals_to_handle=SIGTERM", "--shutdown-timeout", "5", "train.py"]
    assert torchrun_command(given)[3:] == given
    assert exit_code(1, [75, 75]) == 75                       # every worker saved: requeue
    assert exit_code(1, [75, 1]) == 1 and exit_code(1, []) == 1 and exit_code(0, [0, 0]) == 0


def run_two(tmp_path, name, *extra):
    done = subprocess.run(LAUNCH + [RECIPE] + TWO + ["--experiment", name, "--output", str(tmp_path), *extra], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_launcher_saves_exits_75_and_resumes_exactly(tmp_path, signum):
    """The signal goes to the launcher only, as SLURM's `--signal=B:USR1@120` sends it to the batch script, which
    passes it on; the workers hear it from torchrun."""
    run_two(tmp_path, "whole")
    cut = subprocess.Popen(LAUNCH + [RECIPE] + TWO + ["--experiment", "cut", "--output", str(tmp_path)], env=ENV,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(cut, "Train: 0 [   1/")
    cut.send_signal(signum)
    out, err = cut.communicate(timeout=300)
    assert cut.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    last = tmp_path / "cut" / "last.pth.tar"
    assert f"{signal.Signals(signum).name}: stopped after optimizer step" in out
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 8
    run_two(tmp_path, "cut", "--resume", str(last))
    assert_same_run(tmp_path / "whole" / "last.pth.tar", last)


def test_plain_torchrun_forwards_sigusr1_when_told_and_every_worker_exits_75(tmp_path):
    """torchrun's own option (PET_SIGNALS_TO_HANDLE is its environment variable, which `accelerate launch`
    reads too): the workers save and exit 75, though torchrun itself exits 1."""
    env = {**ENV, "PET_SIGNALS_TO_HANDLE": SIGNALS_TO_HANDLE, EXIT_DIR_VARIABLE: str(tmp_path)}
    cut = subprocess.Popen(TORCHRUN + [RECIPE] + TWO + ["--experiment", "cut", "--output", str(tmp_path)], env=env,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(cut, "Train: 0 [   1/")
    cut.send_signal(signal.SIGUSR1)
    out, err = cut.communicate(timeout=300)
    assert cut.returncode == 1, err[-3000:]
    assert sorted(p.read_text() for p in tmp_path.glob("rank-*")) == [str(PREEMPTED_EXIT_CODE)] * 2
    assert torch.load(tmp_path / "cut" / "last.pth.tar", weights_only=True)["epoch"] == 0


def test_the_slurm_script_requeues_a_preempted_run_which_then_resumes(tmp_path):
    """examples/slurm_train.sh as SLURM runs it, with `scontrol` stood in for: SIGUSR1 goes to the batch script
    only (`--signal=B:USR1@120`); the run saves, the script asks for a requeue and exits 75; the requeued job
    resumes from last.pth.tar and finishes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "NPROC": "2",
           "MODEL": "test_resnet", "OUTPUT": str(tmp_path), "EXPERIMENT": "slurm", "TRAIN_ARGS": " ".join(TWO[2:])}
    job = ["bash", str(ROOT / "examples" / "slurm_train.sh")]
    first = subprocess.Popen(job, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(first, "Train: 0 [   1/")
    first.send_signal(signal.SIGUSR1)
    out, err = first.communicate(timeout=300)
    assert first.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 7\n"
    step = torch.load(tmp_path / "slurm" / "last.pth.tar", weights_only=True)["num_updates"]
    again = subprocess.run(job, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tmp_path / 'slurm' / 'last.pth.tar'}: epoch 0, step {step}" in again.stdout
    assert torch.load(tmp_path / "slurm" / "last.pth.tar", weights_only=True)["num_updates"] == 8
