"""A second order you can trust (SPEC.md, Two ways to get the second order; issue 9): exact double backward on
every timm family through timm_mltp.double_backward, fd only where it is measured accurate, and a detector
that says when fd steps across kinks."""
import copy
import logging
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_mltp.auto
from test_mltp import reference_grad
from timm_mltp import (MLTPConfig, MLTPConfigError, mltp_backward, second_order_check, second_order_in_use,
                       select_parameters, split_tasks)
from timm_mltp.double_backward import twice_differentiable
from timm_mltp.mltp import KINK_TOLERANCE


@pytest.fixture
def fd_speed(monkeypatch):
    """Take timing out of `auto`'s choice: fd counts as faster (math.inf) or never (0.0)."""
    return lambda factor: monkeypatch.setattr(timm_mltp.auto, "FD_SPEEDUP", factor)


def ce(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def timm_model(name, dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=10, **kwargs).to(dtype).train()


def image_tasks(dtype=torch.float32, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, 3, 32, 32, generator=g, dtype=dtype)
    return split_tasks((x, torch.randint(0, 10, (2 * n,), generator=g)))


def mltp_grads(model, cfg, tasks, alpha=0.05, seed=123):
    """The MLTP gradient of every parameter, flattened in the order of `named_parameters`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    stats = mltp_backward(model, *tasks, ce, cfg, alpha)
    return torch.cat([p.grad.flatten() for p in model.parameters()]), stats


def rel_err(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


# ---- references built without timm_mltp.double_backward

class CompositeHardswish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3) / 6


class CompositeHardsigmoid(nn.Module):
    def forward(self, x):
        return F.relu6(x + 3) / 6


def with_composite_hard_activations(model):
    """A copy whose nn.Hardswish / nn.Hardsigmoid modules are the composite forms (issue 9's reference)."""
    model = copy.deepcopy(model)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            for native, composite in ((nn.Hardswish, CompositeHardswish), (nn.Hardsigmoid, CompositeHardsigmoid)):
                if isinstance(child, native):
                    setattr(parent, name, composite())
                    replaced += 1
    assert replaced
    return model


def with_eager_attention(model):
    """A copy whose timm attention computes softmax(q k^T) v itself instead of calling the fused kernel."""
    model = copy.deepcopy(model)
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    assert fused
    for m in fused:
        m.fused_attn = False
    return model


REFERENCES = {"test_resnet": copy.deepcopy, "mobilenetv3_small_050": with_composite_hard_activations,
              "test_vit": with_eager_attention}


@pytest.mark.parametrize("faster", [math.inf, 0.0, None], ids=["fd-counts-faster", "fd-never-faster", "untimed"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_auto_delivers_the_exact_gradient(name, faster, fd_speed):
    """float64, brute-force reference (test_mltp.reference_grad) on a copy with a double backward of its own.
    ReLU/max-pool and hard-swish: fd steps across kinks, auto runs exact whatever fd costs. ViT: fd is
    within tolerance, and auto keeps it where it is faster, when asked to time (auto_timing); untimed (the
    default), exact."""
    if faster is not None:
        fd_speed(faster)
    model = timm_model(name, torch.float64)
    tasks = image_tasks(torch.float64)
    s_names = select_parameters(model, "full")
    reference, _ = reference_grad(REFERENCES[name](model), *tasks, s_names, 0.05, 0.5)
    expected = torch.cat([reference[n].flatten() for n, _ in model.named_parameters()])
    got, stats = mltp_grads(model, MLTPConfig("full", auto_timing=faster is not None), tasks)
    check = second_order_check(model, MLTPConfig("full"))
    assert stats.second_order == check.choice == second_order_in_use(model, MLTPConfig("full"))
    assert check.exact == "ok"
    if name == "test_vit" and faster:
        assert stats.second_order == "fd" and check.fd_error < 1e-3
        assert rel_err(got, expected) < 1e-4          # fd's float64 error; fo is 0.8 away
    else:
        assert stats.second_order == "exact"
        assert rel_err(got, expected) < 1e-10
    if name == "test_resnet":
        assert check.fd_error > 1 and check.kinked
    if name == "mobilenetv3_small_050":   # fd's forward step crossed no kink on this step, the detector's did
        assert check.kinked and not check.fd_accurate


def test_exact_works_on_mobilenet_and_on_vit_with_fused_attention():
    """Both fail double backward without the replacements (the CPU's fused attention kernel runs in float64
    too), and match the reference with them."""
    for name in ("mobilenetv3_small_050", "test_vit"):
        model = timm_model(name, torch.float64)
        if name == "test_vit":
            assert all(block.attn.fused_attn for block in model.blocks)
        tasks = image_tasks(torch.float64)
        loss = ce(model, tasks[0])
        g = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
            torch.autograd.grad(sum(x.sum() for x in g), list(model.parameters()), allow_unused=True)
        reference, _ = mltp_grads(REFERENCES[name](model), MLTPConfig("full", second_order="exact"), tasks)
        got, stats = mltp_grads(model, MLTPConfig("full", second_order="exact"), tasks)
        assert stats.second_order == "exact"
        assert rel_err(got, reference) < 1e-10


# ---- the kink detector

@pytest.mark.parametrize("name,kinked", [("test_resnet", True), ("mobilenetv3_small_050", True),
                                         ("test_convnext", False), ("test_vit", False)])
def test_fd_warns_once_on_kinked_networks_and_stays_quiet_on_smooth_ones(name, kinked, caplog):
    model = timm_model(name)
    cfg = MLTPConfig("full", second_order="fd")
    with caplog.at_level(logging.INFO, logger="timm_mltp"):
        for seed in (0, 1):
            _, stats = mltp_grads(model, cfg, image_tasks(n=8, seed=seed))
            assert stats.second_order == "fd"
    check = second_order_check(model, cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if kinked:
        assert check.kinked and check.disagreement > 2.5 * KINK_TOLERANCE
        assert len(warnings) == 1
        assert f"differ by {check.disagreement:.2g}" in warnings[0] and "second_order='fd' is unreliable" in warnings[0]
    else:
        assert not check.kinked and check.disagreement < KINK_TOLERANCE / 10
        assert not warnings


class NetWithoutDoubleBackward(nn.Module):
    """A residual block as timm's ResNets have it (the branch's last BatchNorm starts at zero), then attention
    through aten's fused CPU kernel, called directly: no choice of backend reaches it, and its backward has no
    derivative. Kinked: ReLU (the block's output ReLU sees the zeros of the first one exactly on its kink).
    Smooth: softplus."""

    def __init__(self, kinked: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.norm1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.norm2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        nn.init.zeros_(self.norm2.weight)
        self.act = nn.ReLU() if kinked else nn.Softplus()
        self.pool = nn.AvgPool2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.act(self.norm1(self.conv1(x)))
        h = self.pool(self.act(h + self.norm2(self.conv2(h))))
        tokens = h.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # batch, 1 head, 16 tokens, 8 channels
        attended = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(tokens, tokens, tokens)[0]
        return self.head(attended.mean(2).squeeze(1))


@pytest.mark.parametrize("kinked", [True, False], ids=["relu", "softplus"])
def test_auto_without_double_backward_runs_fd_and_says_when_it_is_unreliable(kinked, caplog):
    model = NetWithoutDoubleBackward(kinked).train()
    with caplog.at_level(logging.INFO, logger="timm_mltp"):
        for seed in (0, 1):
            _, stats = mltp_grads(model, MLTPConfig("full"), image_tasks(seed=seed))
            assert stats.second_order == "fd"
    check = second_order_check(model, MLTPConfig("full"))
    assert "is not implemented" in check.exact and math.isnan(check.fd_error)
    assert check.kinked == kinked
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if kinked:
        assert len(warnings) == 1
        assert "is unreliable" in warnings[0] and "variant 'fo'" in warnings[0] and "SiLU" in warnings[0]
    else:
        assert not warnings
    with pytest.raises(MLTPConfigError, match="even with math attention.*second_order='auto'"):
        mltp_grads(model, MLTPConfig("full", second_order="exact"), image_tasks())


# ---- the probe leaves no trace

@pytest.mark.parametrize("faster,chosen", [(math.inf, "fd"), (0.0, "exact")])
def test_auto_first_step_is_a_plain_step_of_the_chosen_method(faster, chosen, fd_speed):
    """Same gradient (accumulated onto an existing .grad), running statistics and random state afterwards as
    one plain step of the method auto chose: dropout, drop path and BatchNorm, smooth model."""
    fd_speed(faster)
    auto = timm_model("test_efficientnet", drop_rate=0.3, drop_path_rate=0.2)
    plain = copy.deepcopy(auto)
    tasks = image_tasks()
    after = {}
    for model, cfg in ((auto, MLTPConfig("full", auto_timing=True)), (plain, MLTPConfig("full", second_order=chosen))):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        torch.manual_seed(123)
        stats = mltp_backward(model, *tasks, ce, cfg, 0.05)
        after[model] = stats, torch.get_rng_state(), [p.grad for p in model.parameters()], list(model.buffers())
    (stats_a, rng_a, grads_a, buffers_a), (stats_p, rng_p, grads_p, buffers_p) = after[auto], after[plain]
    assert stats_a.second_order == chosen == second_order_in_use(auto, MLTPConfig("full"))
    assert stats_a == stats_p
    assert torch.equal(rng_a, rng_p)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_p))
    assert all(torch.equal(a, b) for a, b in zip(buffers_a, buffers_p))


def test_auto_waits_for_a_step_with_a_second_order_term():
    """alpha = 0 (a learning-rate warmup from 0): nothing to measure, exact runs and auto decides later."""
    model = timm_model("test_resnet")
    _, stats = mltp_grads(model, MLTPConfig("full"), image_tasks(), alpha=0.0)
    assert stats.second_order == "exact"
    assert second_order_in_use(model, MLTPConfig("full")) == "auto"
    assert second_order_check(model, MLTPConfig("full")) is None
    mltp_grads(model, MLTPConfig("full"), image_tasks())
    assert second_order_in_use(model, MLTPConfig("full")) == "exact"
    assert second_order_check(model, MLTPConfig("full")).kinked


# ---- the replacements themselves

def test_twice_differentiable_leaves_the_model_as_it_was():
    for name in ("mobilenetv3_small_050", "test_vit"):
        model = timm_model(name).eval()
        x = image_tasks()[0][0]
        modules = [(n, m) for n, m in model.named_modules()]
        flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                 torch.backends.cuda.math_sdp_enabled())
        with torch.no_grad():
            before = model(x)
            with twice_differentiable():
                inside = model(x)
            after = model(x)
        assert torch.allclose(inside, before, rtol=1e-5, atol=1e-6)  # the same function, other kernels
        assert torch.equal(after, before)
        assert [(n, m) for n, m in model.named_modules()] == modules
        assert all(type(m) is type(m2) for (_, m), (_, m2) in zip(modules, model.named_modules()))
        assert flags == (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                         torch.backends.cuda.math_sdp_enabled())


@pytest.mark.parametrize("fn,second", [(F.hardswish, 1 / 3), (F.hardsigmoid, 0.0)])
def test_composite_hard_activations_match_native_and_differentiate_twice(fn, second):
    x = torch.tensor([-5.0, -3.0, -2.5, -1.0, 0.0, 0.5, 2.9, 3.0, 4.0], dtype=torch.float64)
    away = (x.abs() - 3).abs() > 0.01                # the kinks of hardswish, where one-sided derivatives differ
    native_x = x.clone().requires_grad_()
    native_y = fn(native_x)
    native_g, = torch.autograd.grad(native_y.sum(), native_x)
    with twice_differentiable():
        xs = x.clone().requires_grad_()
        y = fn(xs)
        g, = torch.autograd.grad(y.sum(), xs, create_graph=True)
        h, = torch.autograd.grad(g.sum(), xs)
        in_place = x.clone()
        returned = fn(in_place, inplace=True)
        module_out = (nn.Hardswish() if fn is F.hardswish else nn.Hardsigmoid())(x)
    assert torch.allclose(y, native_y, rtol=1e-15, atol=0) and torch.equal(module_out, y.detach())
    assert returned is in_place and torch.equal(in_place, y.detach())
    assert torch.allclose(g[away], native_g[away], rtol=1e-7, atol=0)   # native hardsigmoid: 1/6 in float32
    inside, outside = x.abs() < 3, x.abs() > 3
    assert torch.allclose(h[inside], torch.full_like(h[inside], second)) and not h[outside].any()


def _hvp_models():
    torch.manual_seed(0)
    smooth = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU(),
                           nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(4, 10))
    kinked = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(4, 10))
    return {"smooth": smooth.double().eval(), "kinked": kinked.double().eval()}


@pytest.mark.parametrize("kind", ["smooth", "kinked"])
def test_hvp_cost_benchmark_products_agree_with_an_independent_reference(kind):
    """benchmarks/hvp_cost.py's Hessian-vector products in float64. Smooth model: against central
    differences of the gradient (independent of any double backward; error ~1e-9 at this step), fd to its
    own step. ReLU / max-pool model, where no difference of gradients is a reference: the double-backward
    products against forward-over-reverse (forward-mode AD, another algorithm), and fd is left out."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "hvp_cost.py"
    spec = importlib.util.spec_from_file_location("hvp_cost", path)
    hvp_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hvp_cost)
    model = _hvp_models()[kind]
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    products = hvp_cost.products(model, x, y)
    if kind == "smooth":
        def grad_at(r):
            with torch.no_grad():
                for p, t in zip(params, v):
                    p.add_(r * t)
            g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, t in zip(params, v):
                    p.sub_(r * t)
            return g
        h = 1e-5
        expected = [(a - b) / (2 * h) for a, b in zip(grad_at(h), grad_at(-h))]
    else:
        expected = products.pop("forward-over-reverse")[0](v)
        products.pop("finite difference (fd)")
    assert len(products) >= 2
    for label, (fn, _) in products.items():
        tol = 1e-2 if "finite" in label else 1e-7                   # fd: O(its step) = 1e-3 here
        assert hvp_cost.relative_error(fn(v), expected) < tol, label
