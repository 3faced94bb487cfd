"""Runs that survive what real training meets (README, Reliability), each on a real run of the recipe or of
MLTPTrainer: unreadable images, preemption by SIGTERM/SIGUSR1, checkpoint files that would run code, a full disk."""
import csv
import errno
import io
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import timm
import torch
from transformers import Trainer, TrainerCallback

from test_recipe import ENV, QUICK, ROOT, TRAIN, run
from test_trainer import mltp_args, tiny_bert, token_data
from timm_mltp import PREEMPTED_EXIT_CODE, MLTPConfigError, MLTPTrainer, PreemptionCallback
from timm_mltp.data import DEFAULT_DATASET

sys.path.insert(0, str(ROOT / "recipes"))
import train as recipe  # noqa: E402

datasets.disable_progress_bars()
TRUNCATED, NOT_AN_IMAGE = 5, 100      # the broken training images' indices


def parquet_with_broken_images(tmp_path, broken: dict, n_train=256, n_test=64, split_broken="train") -> Path:
    """The first shipped images as a local parquet dataset, with the images of split `split_broken` at `broken`'s
    indices replaced: "truncated" (the first half of the PNG) or "garbage" (bytes that are no image)."""
    folder = tmp_path / "broken_data"
    folder.mkdir()
    for split, n in (("train", n_train), ("test", n_test)):
        ds = datasets.load_dataset("parquet", data_files=str(DEFAULT_DATASET / f"{split}.parquet"), split="train")
        ds = ds.select(range(n)).cast_column("image", datasets.Image(decode=False))
        if split == split_broken:
            def spoil(example, index):
                kind, png = broken.get(index), example["image"]["bytes"]
                if kind:
                    png = png[:len(png) // 2] if kind == "truncated" else b"these bytes are no image"
                return {"image": {"bytes": png, "path": None}}
            ds = ds.map(spoil, with_indices=True)
        ds.cast_column("image", datasets.Image()).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def wait_for_line(proc, text: str, timeout: float = 300) -> str:
    """Read the process's stdout until a line holds `text`; the lines read so far."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if text in line or time.time() > deadline:
            break
    return "".join(seen)


def stopped_by_sigterm(args: list[str], output: Path, experiment: str, line: str) -> tuple[str, Path]:
    """Start the recipe in its own process group, send the group SIGTERM (as schedulers do) once stdout shows
    `line`, and check that it exits with the preemption code; its stdout and the checkpoint it saved."""
    cut = subprocess.Popen(TRAIN + args + ["--experiment", experiment, "--output", str(output)], env=ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    seen = wait_for_line(cut, line)
    os.killpg(cut.pid, signal.SIGTERM)
    out, err = cut.communicate(timeout=300)
    assert cut.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    return seen + out, output / experiment / "last.pth.tar"


def assert_same_run(a: Path, b: Path) -> None:
    whole, resumed = (torch.load(p, weights_only=True) for p in (a, b))
    assert resumed["num_updates"] == whole["num_updates"]
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert resumed["rows"] == whole["rows"]


# ---- 1 and 2: unreadable images are skipped; SIGTERM stops after the step with a checkpoint -----------------

def test_unreadable_images_are_skipped_the_same_way_after_sigterm_and_resume(tmp_path):
    data = parquet_with_broken_images(tmp_path, {TRUNCATED: "truncated", NOT_AN_IMAGE: "garbage"})
    args = QUICK + ["--dataset", str(data), "--drop", "0.2", "--lr", "0.02", "--log-interval", "1"]
    whole = run(args + ["--experiment", "whole"], tmp_path)
    for index, reason in ((TRUNCATED, "OSError: image file is truncated"),
                          (NOT_AN_IMAGE, "UnidentifiedImageError: cannot identify image file")):
        assert f"skipped an unreadable sample: split 'train', index {index}: {reason}" in whole.stderr
    assert "Traceback" not in whole.stderr
    assert "unreadable samples skipped: 2 training" in whole.stdout
    rows = list(csv.DictReader(open(tmp_path / "whole" / "summary.csv")))
    assert [(r["train_skipped"], r["eval_skipped"]) for r in rows] == [("2", "0")]

    # the same run with a loader worker, stopped by SIGTERM to its process group (as schedulers send it) in its
    # first epoch, then resumed
    args += ["--workers", "1"]
    out, last = stopped_by_sigterm(args, tmp_path, "cut", "Train: 0 [   2/")
    (line,) = [x for x in out.splitlines() if x.startswith("SIGTERM: ")]
    assert f"saved {last}; run the same command with --resume {last} to continue" in line
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0 and 3 <= state["step_in_epoch"] < 8, "the stop lands after the step in progress"
    assert f"batch {state['step_in_epoch']})" in line
    resumed = run(args + ["--experiment", "cut", "--resume", str(last)], tmp_path)
    assert "unreadable samples skipped: 2 training" in resumed.stdout
    assert_same_run(tmp_path / "whole" / "last.pth.tar", last)


@pytest.mark.parametrize("broken, options, message", [
    ({k: "garbage" for k in range(40, 52)}, ["--max-bad-share", "1"],
     r"10 samples in a row of split 'train' cannot be read \(indices 4\d to \d\d; the warnings above"),
    ({k: "garbage" for k in range(40, 52)}, ["--max-bad-share", "1", "--workers", "1"],   # raised in a worker
     r"10 samples in a row of split 'train' cannot be read \(indices 4\d to \d\d; the warnings above"),
    ({k: "truncated" for k in (3, 30, 60)}, [],       # more than --max-bad-share 0.01 of 128: 2 or more
     r"[23] of the 128 samples in split 'train' were unreadable in this epoch so far, more than --max-bad-share 0.01"),
], ids=["in-a-row", "in-a-row-in-a-worker", "share"])
def test_too_many_unreadable_samples_end_the_run_in_one_line(tmp_path, capsys, broken, options, message):
    data = parquet_with_broken_images(tmp_path, broken, n_train=128, n_test=32)
    assert recipe.main(QUICK + ["--dataset", str(data), "--output", str(tmp_path)] + options) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: ") and re.search(message, err[-1]), err[-1]
    assert not any("Traceback" in line for line in err)


def test_an_unreadable_eval_sample_counts_once_over_two_processes(tmp_path):
    """33 test images over 2 processes: the second process's last batch is padded with the split's first samples,
    and the unreadable image 0 is among them; the gathered count drops the padding with the logits."""
    data = parquet_with_broken_images(tmp_path, {0: "garbage"}, n_train=64, n_test=33, split_broken="test")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(ROOT / "recipes" / "train.py")]
    done = subprocess.run(launch + QUICK + ["--dataset", str(data), "--max-bad-share", "0.1", "--experiment", "e",
                                            "--output", str(tmp_path)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped an unreadable sample: split 'eval', index 0" in done.stderr
    rows = list(csv.DictReader(open(tmp_path / "e" / "summary.csv")))
    assert [(r["train_skipped"], r["eval_skipped"]) for r in rows] == [("0", "1")]


@pytest.mark.slow
def test_two_processes_stop_after_the_same_step_when_one_is_signalled(tmp_path):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "recipes" / "train.py")]
    proc = subprocess.Popen(launch + QUICK + ["--max-train-samples", "512", "--log-interval", "1", "--experiment",
                                              "two", "--output", str(tmp_path)],
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(proc, "Train: 0 [   1/")
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(max(workers, key=int)), signal.SIGUSR1)     # one process only (the later-started one)
    out, err = proc.communicate(timeout=300)
    state = torch.load(tmp_path / "two" / "last.pth.tar", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 8
    lines = [x for x in out.splitlines() if "stopped after optimizer step" in x]
    assert len(lines) == 1 and f"step {state['num_updates']} " in lines[0], out[-2000:] + err[-2000:]
    assert lines[0].startswith(("SIGUSR1: ", "another process was signalled: "))
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in err   # torchrun's report: every worker exited with the code


# ---- 2: MLTPTrainer, and any Trainer, through PreemptionCallback -----------------------------------------

class _SignalAtStep(TrainerCallback):
    """Sends the process `signum` while step `step` runs, as a scheduler would."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


SETTINGS = dict(per_device_train_batch_size=8, max_steps=6, learning_rate=3e-3, mltp_variant="full",
                mltp_alpha_rule="lr", mltp_alpha_scale=10.0, logging_steps=1, mltp_second_order="exact")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_mltp_trainer_saves_and_stops_on_a_signal_and_resumes_exactly(tmp_path, signum):
    whole = MLTPTrainer(model=tiny_bert(dropout=0.1), args=mltp_args(tmp_path / "whole", **SETTINGS),
                        train_dataset=token_data(64))
    whole.train()
    cut = MLTPTrainer(model=tiny_bert(dropout=0.1), args=mltp_args(tmp_path / "cut", **SETTINGS),  # save_strategy no
                      train_dataset=token_data(64), callbacks=[_SignalAtStep(3, signum)])
    cut.train()
    assert cut.preemption.preempted == signal.Signals(signum).name and cut.state.global_step == 3
    assert signal.getsignal(signum) is signal.SIG_DFL          # the handlers are put back
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    assert (checkpoint / "mltp_step.pt").is_file()
    resumed = MLTPTrainer(model=tiny_bert(dropout=0.1), args=mltp_args(tmp_path / "cut", **SETTINGS),
                          train_dataset=token_data(64))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


class _SignalWorkersAtStep(TrainerCallback):
    """SIGUSR1 to every loader worker while step `step` runs, as a scheduler's signal to the whole job reaches
    them (SIGTERM from this process would be the loader's own order to stop)."""

    def __init__(self, step):
        self.step, self.workers, self.handler = step, [], None

    def on_epoch_begin(self, args, state, control, **kwargs):
        # the loader forks its workers next: let them start with the default handlers, as with the spawn and
        # forkserver start methods (a forked worker would inherit this process's preemption handler)
        self.handler = signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.handler is not None:
            signal.signal(signal.SIGUSR1, self.handler)
            self.handler = None
        if state.global_step + 1 == self.step:
            self.workers = [child.pid for child in multiprocessing.active_children()]
            for pid in self.workers:
                os.kill(pid, signal.SIGUSR1)


def test_mltp_trainer_loader_workers_outlive_a_signal_to_the_job(tmp_path):
    signaller = _SignalWorkersAtStep(2)
    settings = {**SETTINGS, "dataloader_num_workers": 1}
    trainer = MLTPTrainer(model=tiny_bert(), args=mltp_args(tmp_path, **settings), train_dataset=token_data(256),
                          callbacks=[signaller])
    trainer.train()          # a worker killed by the signal: "DataLoader worker ... exited unexpectedly"
    assert signaller.workers and trainer.state.global_step == SETTINGS["max_steps"]


def test_a_plain_trainer_takes_the_callback(tmp_path):
    callback = PreemptionCallback()
    args = mltp_args(tmp_path, per_device_train_batch_size=8, max_steps=6, learning_rate=3e-3)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=token_data(64),
                      callbacks=[callback, _SignalAtStep(2, signal.SIGTERM)])
    trainer.train()
    assert callback.preempted == "SIGTERM" and trainer.state.global_step == 2
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()


# ---- 3: no code from checkpoint files ----------------------------------------------------------------------

def _write_marker(path):
    Path(path).write_text("unpickling ran code from the checkpoint")


class RunsCode:
    """Unpickling this calls _write_marker: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


def file_that_runs_code(tmp_path, **state) -> tuple[Path, Path]:
    marker, path = tmp_path / "marker", tmp_path / "weights.pth"
    torch.save({**state, "payload": RunsCode(marker)}, path)
    return path, marker


@pytest.mark.parametrize("option", ["--resume", "--initial-checkpoint", "--pretrained-path"])
def test_checkpoint_files_that_would_run_code_are_refused(tmp_path, capsys, option):
    weights = timm.create_model("test_resnet", num_classes=10).state_dict()
    path, marker = file_that_runs_code(tmp_path, arch="test_resnet", state_dict=weights)
    argv = QUICK + ["--max-train-samples", "64", "--output", str(tmp_path), option, str(path)]
    assert recipe.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {option} '{path}' holds Python objects beyond tensors")
    assert "test_reliability._write_marker" in err and "pass --trust-checkpoint if you trust this file" in err
    assert not marker.exists()
    if option == "--initial-checkpoint":   # the opt-in loads it, and so runs its code
        assert recipe.main(argv + ["--trust-checkpoint", "--experiment", "trusted"]) == 0
        assert marker.exists()


def test_mltp_trainer_refuses_a_checkpoint_file_that_would_run_code(tmp_path):
    settings = {**SETTINGS, "max_steps": 2, "save_strategy": "steps", "save_steps": 2}
    MLTPTrainer(model=tiny_bert(), args=mltp_args(tmp_path, **settings), train_dataset=token_data(64)).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert torch.load(checkpoint / "mltp_step.pt", weights_only=True)   # its own files need no pickle
    path, marker = file_that_runs_code(tmp_path, inner_step={})
    os.replace(path, checkpoint / "mltp_step.pt")
    resumed = MLTPTrainer(model=tiny_bert(), args=mltp_args(tmp_path, **{**settings, "max_steps": 3}),
                          train_dataset=token_data(64))
    with pytest.raises(MLTPConfigError, match="mltp_step.pt' holds Python objects beyond tensors") as refused:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "\n" not in str(refused.value) and not marker.exists()


# ---- 4: a full disk while saving -------------------------------------------------------------------------

def test_a_full_disk_keeps_the_previous_checkpoint_and_ends_in_one_line(tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        calls.append(obj["num_updates"])
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        data = io.BytesIO()
        real_save(obj, data)
        f.write(data.getvalue()[:len(data.getvalue()) // 2])     # part of it, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    argv = QUICK + ["--max-train-samples", "128", "--checkpoint-interval", "2", "--experiment", "full",
                    "--output", str(tmp_path)]
    assert recipe.main(argv) == 2
    last = tmp_path / "full" / "last.pth.tar"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: could not write {last} (No space left on device)" in err
    assert "the previous last.pth.tar, if any, is intact" in err
    assert calls == [2, 4] and sorted(p.name for p in last.parent.iterdir()) == ["args.yaml", "last.pth.tar"]
    assert torch.load(last, weights_only=True)["num_updates"] == 2
