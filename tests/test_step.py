"""One MLTP step for both integrations (timm_mltp/step.py), and a core that stays right when the model changes:
fp16 under a gradient scaler in the recipe's engine, replaced parameters, another dtype, `auto` per selection,
fd at zero weights, and errors that are not "no double backward" propagating."""
import copy
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType

import timm_mltp.engine
import timm_mltp.auto
import timm_mltp.trainer
from timm_mltp import MLTPConfig, MLTPConfigError, MLTPStep, mltp_backward, second_order_in_use, split_tasks
from timm_mltp.engine import TrainArgs, Trainer, check_distributed_type
from timm_mltp.mltp import is_double_backward_error


def ce(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def small_net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 4)).to(dtype).train()


def tasks(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return split_tasks((torch.randn(12, 6, generator=g).to(dtype), torch.randint(0, 4, (12,), generator=g)))


def grads(model, cfg, alpha=0.3, batches=None):
    model.zero_grad(set_to_none=True)
    stats = mltp_backward(model, *(batches or tasks(next(model.parameters()).dtype)), ce, cfg, alpha)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def rel_err(a, b):
    return max((a[n] - b[n]).norm().item() for n in b) / max(b[n].norm().item() for n in b)


# ---- the engine under an fp16 gradient scaler (what Accelerate builds on every CUDA machine)

@pytest.fixture
def cpu_fp16_accelerator():
    """Accelerate's fp16 setup (fp16 autocast and a GradScaler), on the CPU, where Accelerate refuses fp16."""
    made = []

    def make(**scaler_kwargs):
        acc = Accelerator(cpu=True)
        acc.native_amp = True
        acc.state._mixed_precision = "fp16"
        acc.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
        made.append(acc)
        return acc

    yield make
    for acc in made:                      # AcceleratorState is shared by every Accelerator of this process
        acc.state._mixed_precision = "no"


def engine_args(tmp_path, **kwargs):
    return TrainArgs(**{**dict(model="test_resnet", epochs=1, batch_size=8, max_train_samples=128, workers=0,
                               output=str(tmp_path), experiment="fp16", progress=False, lr=0.02), **kwargs})


def test_engine_trains_in_fp16_and_backs_off_after_an_overflow(tmp_path, cpu_fp16_accelerator):
    # the first scale overflows any gradient; the scaler must skip that step, back off and training go on
    acc = cpu_fp16_accelerator(init_scale=2.0 ** 40, backoff_factor=2.0 ** -30, growth_interval=1000)
    trainer = Trainer(engine_args(tmp_path, variant="full", second_order="fd", max_train_samples=256, lr=0.05),
                      accelerator=acc)
    initial = copy.deepcopy(trainer.module.state_dict())
    result = trainer.fit()
    steps = 256 // 16
    assert trainer.step.loss_scale() == 2.0 ** 10                   # backed off once, never again
    assert result["optimizer_steps"] == steps - 1                   # the overflow step changed nothing
    assert any(not torch.equal(v, trainer.module.state_dict()[k]) for k, v in initial.items())
    row = result["rows"][0]
    # the skipped step's passes (at w' = nan) left no trace in the BatchNorm statistics, and the run learned:
    # below the loss of a uniform guess over 10 classes
    assert all(torch.isfinite(b).all() for b in trainer.module.buffers())
    # (ln 10 = 2.303; measured 2.19 and 2.12 over 16 steps; 8 steps left it within 0.03 of chance). Not the eval
    # loss: after 15 steps BatchNorm's running statistics are still far from the batches' (measured 2.59 on an
    # AMD CPU, 2.1-2.2 on an Intel one, for the same training loss)
    assert row["train_loss"] < 2.25 and math.isfinite(row["eval_loss"])


def test_engine_fp16_step_matches_the_core_and_a_non_finite_loss_backs_off(tmp_path, cpu_fp16_accelerator):
    acc = cpu_fp16_accelerator(init_scale=2.0 ** 10, growth_interval=1000)
    trainer = Trainer(engine_args(tmp_path, variant="fo", alpha_rule="lr"), accelerator=acc)
    batch = next(iter(trainer.train_loader))
    model = copy.deepcopy(trainer.module)
    seen = {}
    trainer.optimizer.optimizer.register_step_pre_hook(lambda *_: seen.update(
        {n: p.grad.clone() for n, p in trainer.module.named_parameters()}))
    trainer.train_step(batch)
    # the optimizer saw the unscaled fp16 MLTP gradient the core computes with the same loss scale
    with torch.autocast("cpu", dtype=torch.float16):
        mltp_backward(model, *split_tasks((batch["pixel_values"], batch["labels"])), ce, MLTPConfig("fo"),
                      alpha=0.02, loss_scale=2.0 ** 10)
    expected = {n: p.grad / 2.0 ** 10 for n, p in model.named_parameters()}
    assert rel_err(seen, expected) < 1e-3
    # a loss that is not finite: every process skips the step, and the scaler backs off
    trainer.step.loss_fn = lambda m, b: ce(m, b) * float("nan")
    before = copy.deepcopy(trainer.module.state_dict())
    assert trainer.train_step(batch) is None
    assert trainer.step.loss_scale() == 2.0 ** 9
    assert all(torch.equal(v, trainer.module.state_dict()[k]) for k, v in before.items())


def test_recipe_refuses_deepspeed_and_fsdp():
    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        fake = type("FakeAccelerator", (), {"distributed_type": kind})()
        with pytest.raises(MLTPConfigError, match=f"not {kind.value}.*choose multi-GPU"):
            check_distributed_type(fake)


def test_both_integrations_go_through_the_one_step():
    for module in (timm_mltp.engine, timm_mltp.trainer):
        source = inspect.getsource(module)
        assert "MLTPStep(" in source
        for private_copy in ("mltp_backward(", "average_gradients(", "broadcast_buffers(", ".scaler.scale("):
            assert private_copy not in source, (module.__name__, private_copy)


# ---- caches that follow the model

@pytest.mark.parametrize("second_order", ["exact", "fd"])
def test_replaced_parameters_get_the_gradient(second_order):
    model = small_net()
    grads(model, MLTPConfig("full", second_order=second_order))
    replacement = {k: v.clone() * 1.5 for k, v in model.state_dict().items()}
    model.load_state_dict(replacement, assign=True)         # new Parameter objects, as checkpoint loaders do
    got, _ = grads(model, MLTPConfig("full", second_order=second_order))
    fresh = small_net()
    fresh.load_state_dict(replacement)
    expected, _ = grads(fresh, MLTPConfig("full", second_order=second_order))
    assert rel_err(got, expected) < 1e-12
    assert all(p.grad is not None for p in model.parameters())


def test_a_dtype_change_between_fd_steps():
    model = small_net(torch.float32)
    grads(model, MLTPConfig("full", second_order="fd"))      # scratch storage in float32
    model.double()
    got, stats = grads(model, MLTPConfig("full", second_order="fd", fd_scheme="central"))
    expected, _ = grads(model, MLTPConfig("full", second_order="exact"))
    assert stats.second_order == "fd" and rel_err(got, expected) < 1e-7


def test_fd_with_all_weights_of_s_zero_matches_exact():
    model = small_net()
    with torch.no_grad():                                    # a zero-initialised classifier (or LoRA B)
        model[4].weight.zero_()
        model[4].bias.zero_()
    cfg = dict(variant="4.*", fd_scheme="central")
    expected, _ = grads(model, MLTPConfig(second_order="exact", **cfg))
    got, _ = grads(model, MLTPConfig(second_order="fd", **cfg))
    assert rel_err(got, expected) < 1e-7


class BodyWithoutDoubleBackward(nn.Module):
    """A body through aten's fused CPU attention kernel, whose backward has no derivative (called directly,
    so no choice of attention backend reaches it), and a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        q = self.body(x).view(len(x), 1, 2, 4)
        attended = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, q, q)[0]
        return self.head(attended.reshape(len(x), 8))


def test_auto_decides_per_selection(monkeypatch):
    monkeypatch.setattr(timm_mltp.auto, "FD_SPEEDUP", 0.0)   # fd only when exact fails: no timing involved
    model = BodyWithoutDoubleBackward().train()
    batches = tasks(torch.float32)
    _, head = grads(model, MLTPConfig("head.*"), batches=batches)  # S = the head: no double backward of the body
    _, full = grads(model, MLTPConfig("full"), batches=batches)     # S includes the body: exact fails, fd
    assert (head.second_order, full.second_order) == ("exact", "fd")
    assert second_order_in_use(model, MLTPConfig("head.*")) == "exact"
    assert second_order_in_use(model, MLTPConfig("full")) == "fd"
    _, again = grads(model, MLTPConfig("head.*"), batches=batches)
    assert again.second_order == "exact"


def test_only_missing_double_backward_falls_back_to_fd():
    assert is_double_backward_error(RuntimeError("derivative for aten::hardswish_backward is not implemented"))
    assert is_double_backward_error(RuntimeError(
        "trying to differentiate twice a function that was marked with @once_differentiable"))
    for other in (RuntimeError("CUDA error: operation not supported on this device"),
                  RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                  NotImplementedError("Module [Foo] is missing the required \"forward\" function")):
        assert not is_double_backward_error(other)

    model = small_net()

    def broken(module, batch):
        raise RuntimeError("CUDA error: operation not supported on this device")
    with pytest.raises(RuntimeError, match="not supported on this device"):
        mltp_backward(model, *tasks(), broken, MLTPConfig("full"), 0.1)


def test_loss_scale_may_be_a_tensor():
    model = small_net()
    once, _ = grads(model, MLTPConfig("full", second_order="fd"))
    model.zero_grad(set_to_none=True)
    mltp_backward(model, *tasks(), ce, MLTPConfig("full", second_order="fd"), 0.3, loss_scale=torch.tensor(8.0))
    assert rel_err({n: p.grad / 8 for n, p in model.named_parameters()}, once) < 1e-9


def test_processes_go_on_with_process_zeros_second_order(tmp_path):
    worker = Path(__file__).with_name("step_agreement_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(2)]
    assert measured[0] == ["exact", "exact", "exact"]
    assert measured[1] == ["fd", "exact", "exact"]     # settled on fd itself, then took process 0's choice


def test_a_step_with_alpha_zero_settles_nothing(monkeypatch):
    """Warmup from lr 0: `auto` has no second-order term to measure, and must measure on the next step."""
    monkeypatch.setattr(timm_mltp.auto, "FD_SPEEDUP", 1e9)   # fd wherever it is accurate: the smooth net below
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = MLTPStep(Accelerator(cpu=True), model, optimizer, MLTPConfig("full", alpha_rule="lr", auto_timing=True),
                    ce)
    batch = lambda seed: tuple(torch.cat(parts) for parts in zip(*tasks(seed=seed)))   # noqa: E731
    step.pair(batch(1))
    assert step.cfg.second_order == "auto" and second_order_in_use(model, MLTPConfig("full")) == "auto"
    optimizer.param_groups[0]["lr"] = 0.1
    stats = step.pair(batch(2))
    assert stats.second_order == "fd" and step.cfg.second_order == "fd"
