"""The reproducibility promise (docs/reliability.md): the same seed on the same machine and software gives the
same run to the bit, whatever a clock would say. `auto` decides without one unless asked (auto_timing); a
timing that says the other thing changes nothing. --deterministic / full_determinism keep that promise too."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import timm_mltp.auto
from test_recipe import ENV, QUICK, ROOT, TRAIN
from test_trainer import mltp_args, tiny_bert, token_data
from timm_mltp import MLTPTrainer

sys.path.insert(0, str(ROOT / "recipes"))
import train as recipe  # noqa: E402

# test_convnext is smooth (GELU, LayerNorm, average pooling): fd is accurate there, so only a clock could make
# auto pick fd over exact
RUN = QUICK + ["--model", "test_convnext", "--max-train-samples", "128", "--drop", "0.2", "--lr", "0.02"]


def weights(path):
    return torch.load(path / "last.pth.tar", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def second_orders(path) -> list[str]:
    return [row["second_order"] for row in csv.DictReader(open(path / "summary.csv"))]


@pytest.fixture
def clock(monkeypatch):
    """What one timed step of fd against exact would say: fd faster (math.inf) or never faster (0.0)."""
    return lambda fd_speedup: monkeypatch.setattr(timm_mltp.auto, "FD_SPEEDUP", fd_speedup)


def test_a_seeded_recipe_run_does_not_depend_on_a_clock(tmp_path, clock):
    for name, fd_speedup in (("fd-faster", math.inf), ("fd-slower", 0.0)):
        clock(fd_speedup)
        assert recipe.main(RUN + ["--experiment", name, "--output", str(tmp_path)]) == 0
        assert second_orders(tmp_path / name) == ["exact"]        # recorded with the run
    assert_same_weights(weights(tmp_path / "fd-faster"), weights(tmp_path / "fd-slower"))
    # the clock is heard only when asked: then it decides, and the run differs
    clock(math.inf)
    assert recipe.main(RUN + ["--experiment", "timed", "--auto-timing", "--output", str(tmp_path)]) == 0
    assert second_orders(tmp_path / "timed") == ["fd"]
    timed, untimed = weights(tmp_path / "timed"), weights(tmp_path / "fd-faster")
    assert any(not torch.equal(v, untimed[k]) for k, v in timed.items())


def test_deterministic_runs_repeat_to_the_bit(tmp_path):
    """--deterministic turns on torch's deterministic algorithms, process-wide: its runs go in their own processes.
    Two of them, and a plain one, end with the same weights."""
    for name, extra in (("d1", ["--deterministic"]), ("d2", ["--deterministic"]), ("plain", [])):
        done = subprocess.run(TRAIN + RUN + extra + ["--experiment", name, "--output", str(tmp_path)], env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "d1"), weights(tmp_path / "d2"))
    assert_same_weights(weights(tmp_path / "d1"), weights(tmp_path / "plain"))   # this CPU's kernels already are


TRAINER = dict(per_device_train_batch_size=8, max_steps=4, learning_rate=3e-3, mltp_variant="full",
               logging_steps=1)


@pytest.fixture
def restore_determinism():
    """full_determinism switches torch's deterministic algorithms on for the whole process: back off after."""
    before, env = torch.are_deterministic_algorithms_enabled(), dict(os.environ)
    yield
    torch.use_deterministic_algorithms(before)
    os.environ.clear()
    os.environ.update(env)


def train_trainer(tmp_path, name, **settings):
    trainer = MLTPTrainer(model=tiny_bert(dropout=0.1), args=mltp_args(tmp_path / name, **{**TRAINER, **settings}),
                          train_dataset=token_data(64))
    trainer.train()
    logged = [log["mltp_second_order"] for log in trainer.state.log_history if "mltp_second_order" in log]
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, logged


def test_a_seeded_mltp_trainer_run_does_not_depend_on_a_clock(tmp_path, clock, restore_determinism):
    clock(math.inf)
    fast, logged = train_trainer(tmp_path, "fd-faster")
    assert logged == ["exact"]                                   # logged once, when auto settled
    clock(0.0)
    slow, _ = train_trainer(tmp_path, "fd-slower")
    assert_same_weights(fast, slow)
    determined, _ = train_trainer(tmp_path, "full-determinism", full_determinism=True)
    assert torch.are_deterministic_algorithms_enabled()          # the Trainer honoured it
    assert_same_weights(fast, determined)
    clock(math.inf)
    timed, logged = train_trainer(tmp_path, "timed", mltp_auto_timing=True)
    assert logged == ["fd"] and any(not torch.equal(v, fast[k]) for k, v in timed.items())
