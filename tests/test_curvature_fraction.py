"""Curvature from a sample (SPEC.md, Two ways to get the second order; issue 17): H_i v on a random fraction rho
of task i, g_i and w' from all of it. rho = 1 is the plain method bit for bit; rho < 1 is the brute-force
gradient on the drawn sample, and unbiased."""
import copy
import itertools
import logging
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.func import functional_call

import timm_mltp.auto
import timm_mltp.mltp
from test_mltp import ce, per_element_alpha, relu_maxpool_net, small_net, tasks
from timm_mltp import MLTPConfig, MLTPConfigError, mltp_backward, second_order_check, select_parameters

BEFORE = "c11789f"   # the last commit before curvature_fraction


def kinked_tasks():
    task_i, task_j = (torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                      for s in (1, 2))
    return (task_i, torch.arange(6) % 5), (task_j, torch.arange(6) % 5)


def smooth_net_without_bn():
    """H_i is exactly the mean of per-sample Hessians only without batch statistics."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double().train()


def recorded_rows(monkeypatch, forced=None):
    """The rows each step's sample took (or `forced` rows instead of the drawn ones)."""
    drawn = []

    def rows_of(task, rows):
        rows = rows if forced is None else torch.as_tensor(forced)
        drawn.append(rows.clone())
        return timm_mltp.tasks.rows_of(task, rows)

    monkeypatch.setattr(timm_mltp.mltp, "rows_of", rows_of)
    return drawn


def gradient(model, task_i, task_j, alpha=0.3, gamma=0.4, seed=5, **cfg):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    stats = mltp_backward(model, task_i, task_j, ce, MLTPConfig(gamma=gamma, **cfg), alpha)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def sampled_reference(model, task_i, task_j, sample, s_names, alpha, gamma):
    """(1-gamma) g_i + gamma g_j'(w' constant) - gamma H_sample (alpha P_S g_j'), term by term, float64."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}

    def loss(at, task):
        return ce(lambda x: functional_call(model, {**at, **buffers}, (x,)), task)

    names = list(params)
    g_i = dict(zip(names, torch.autograd.grad(loss(params, task_i), list(params.values()))))
    a = {n: alpha[n] if isinstance(alpha, dict) else alpha for n in s_names}
    w_prime = {n: (p - a[n] * g_i[n] if n in s_names else p).detach().requires_grad_() for n, p in params.items()}
    g_j = dict(zip(names, torch.autograd.grad(loss(w_prime, task_j), list(w_prime.values()))))
    g_sample = torch.autograd.grad(loss(params, sample), [params[n] for n in s_names], create_graph=True)
    inner = sum((g * (a[n] * g_j[n])).sum() for n, g in zip(s_names, g_sample))
    h = dict(zip(names, torch.autograd.grad(inner, list(params.values()), allow_unused=True)))
    return {n: (1 - gamma) * g_i[n] + gamma * (g_j[n] - (0 if h[n] is None else h[n])) for n in names}


def max_rel_err(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a) / max(b[n].abs().max().item() for n in b)


# ---- rho = 1: today's gradient, bit for bit

def code_before(tmp_path):
    """timm_mltp as it was at BEFORE, importable as `timm_mltp_before`; None without git or that commit."""
    root = pathlib.Path(__file__).parent.parent
    try:
        archive = subprocess.run(["git", "-C", str(root), "archive", BEFORE, "timm_mltp"], capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    (tmp_path / "timm_mltp").rename(tmp_path / "timm_mltp_before")
    sys.path.insert(0, str(tmp_path))
    try:
        import timm_mltp_before.mltp as before
    finally:
        sys.path.remove(str(tmp_path))
    return before


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    module = code_before(tmp_path_factory.mktemp("before"))
    if module is None:
        pytest.skip(f"needs git and commit {BEFORE} (the code before curvature_fraction)")
    return module


@pytest.mark.parametrize("make", [small_net, relu_maxpool_net], ids=["smooth", "kinked"])
@pytest.mark.parametrize("second_order,scheme,speedup", [("exact", "forward", 0), ("fd", "forward", 0),
                                                         ("fd", "central", 0), ("auto", "forward", math.inf),
                                                         ("auto", "forward", 0)])
def test_rho_one_is_the_gradient_of_the_code_before(make, second_order, scheme, speedup, before, monkeypatch):
    """torch.equal with the code of commit BEFORE: gradients, losses, random state and running statistics."""
    monkeypatch.setattr(timm_mltp.auto, "FD_SPEEDUP", speedup)
    monkeypatch.setattr(before, "FD_SPEEDUP", speedup)
    task_i, task_j = kinked_tasks() if make is relu_maxpool_net else tasks()
    model = make()
    for variant, alpha in (("full", 0.3), ("fc", per_element_alpha(model, select_parameters(model, "fc")))):
        after = []
        for mltp, cfg in ((before, before.MLTPConfig(variant, second_order=second_order, fd_scheme=scheme)),
                          (timm_mltp.mltp, MLTPConfig(variant, second_order=second_order, fd_scheme=scheme,
                                                      curvature_fraction=1.0,       # the code before timed auto
                                                      auto_timing=second_order == "auto"))):
            m = copy.deepcopy(model)
            torch.manual_seed(5)
            stats = mltp.mltp_backward(m, task_i, task_j, ce, cfg, alpha)
            after.append(([p.grad for p in m.parameters()], list(m.buffers()), torch.get_rng_state(), stats))
        (g_b, b_b, rng_b, s_b), (g_a, b_a, rng_a, s_a) = after
        assert all(torch.equal(x, y) for x, y in zip(g_a, g_b))
        assert all(torch.equal(x, y) for x, y in zip(b_a, b_b)) and torch.equal(rng_a, rng_b)
        assert (s_a.loss, s_a.loss_i, s_a.loss_j, s_a.second_order) == (s_b.loss, s_b.loss_i, s_b.loss_j,
                                                                        s_b.second_order)


# ---- rho < 1: the brute-force gradient on the drawn sample

@pytest.mark.parametrize("make", [small_net, relu_maxpool_net], ids=["smooth", "kinked"])
@pytest.mark.parametrize("variant", ["full", "fc"])
@pytest.mark.parametrize("second_order,scheme,tol", [("exact", "forward", 1e-10), ("fd", "forward", 1e-5),
                                                     ("fd", "central", 1e-7)])
@pytest.mark.parametrize("per_element", [False, True], ids=["alpha", "D"])
def test_sampled_gradient_matches_brute_force_on_the_drawn_sample(make, variant, second_order, scheme, tol,
                                                                  per_element, monkeypatch):
    model = make()
    task_i, task_j = kinked_tasks() if make is relu_maxpool_net else tasks()
    s_names = select_parameters(model, variant)
    alpha = per_element_alpha(model, s_names) if per_element else 0.3
    drawn = recorded_rows(monkeypatch)
    got, stats = gradient(model, task_i, task_j, alpha, variant=variant, second_order=second_order,
                          fd_scheme=scheme, curvature_fraction=0.5)
    assert stats.second_order == second_order and len(drawn) == 1 and len(drawn[0]) == 3
    sample = timm_mltp.tasks.rows_of(task_i, drawn[0])
    expected = sampled_reference(model, task_i, task_j, sample, s_names, alpha, 0.4)
    assert max_rel_err(got, expected) < tol
    # the sample matters: the plain method (H_i on all of task i) is far from it
    plain, _ = gradient(model, task_i, task_j, alpha, variant=variant, second_order="exact")
    assert max_rel_err(plain, expected) > 1e3 * tol


def test_sample_is_at_least_one_row_and_follows_the_seed(monkeypatch):
    """One row at least; two under BatchNorm in training mode (batch statistics of one sample at 1x1 are not
    defined)."""
    drawn = recorded_rows(monkeypatch)
    for model, least in ((smooth_net_without_bn(), 1), (small_net(), 2)):
        drawn.clear()
        for seed in (5, 5, 6):
            gradient(model, *tasks(), seed=seed, second_order="fd", curvature_fraction=0.01)
        assert [len(rows) for rows in drawn] == [least] * 3
        assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
        _, stats = gradient(model, *tasks(), second_order="exact", curvature_fraction=0.99)   # rounds to all 6
        assert len(drawn) == 3 and stats.second_order == "exact"


@pytest.mark.parametrize("second_order", ["exact", "fd"])
def test_mean_over_draws_is_the_full_gradient(second_order, monkeypatch):
    """Without batch statistics H_i is the mean of per-sample Hessians. Every one of the C(6, 3) = 20 samples
    at rho = 1/2: their mean is the rho = 1 gradient to rounding. 300 random draws: the mean's squared distance
    from it within 9 times its expected value tr(Cov)/N (chi-square with one degree of freedom at worst: a 0.3%
    chance of failing), a bound under a tenth of the second-order term."""
    model = smooth_net_without_bn()
    task_i, task_j = tasks()
    cfg = dict(second_order=second_order, fd_scheme="central")
    full = torch.cat([g.flatten() for g in gradient(model, task_i, task_j, **cfg)[0].values()])
    first = torch.cat([g.flatten() for g in gradient(model, task_i, task_j, variant="fo",
                                                     alpha={n: 0.3 for n, _ in model.named_parameters()})[0].values()])

    def sampled(seed, rows=None):
        if rows is not None:
            recorded_rows(monkeypatch, forced=rows)
        g, _ = gradient(model, task_i, task_j, seed=seed, curvature_fraction=0.5, **cfg)
        return torch.cat([x.flatten() for x in g.values()])

    every = torch.stack([sampled(0, list(rows)) for rows in itertools.combinations(range(6), 3)])
    assert ((every.mean(0) - full).norm() / (full - first).norm()).item() < 1e-9
    monkeypatch.undo()
    draws = torch.stack([sampled(seed) for seed in range(300)])
    n, mean = len(draws), draws.mean(0)
    spread = draws.var(0).sum().item()                               # tr(Cov), estimated
    assert spread > 1e-3 * ((full - first) ** 2).sum().item()       # the draws really differ
    assert n * ((mean - full) ** 2).sum().item() < 9 * spread
    # and the bound is tight enough to see a bias of a tenth of the second-order term
    assert 3 * math.sqrt(spread / n) < 0.1 * (full - first).norm().item()


# ---- what the sample's pass leaves

@pytest.mark.parametrize("second_order", ["exact", "fd"])
def test_sample_pass_leaves_running_statistics_and_replays_task_i_dropout(second_order):
    """Running statistics as the two real passes leave them; with dropout the sampled gradient is still the
    derivative of one function (fd central against exact on the same sample, same masks)."""
    model = small_net()
    reference = copy.deepcopy(model)
    task_i, task_j = tasks()
    gradient(model, task_i, task_j, second_order=second_order, curvature_fraction=0.5)
    gradient(reference, task_i, task_j, second_order=second_order)
    for (n, b), r in zip(model.named_buffers(), reference.buffers()):
        assert torch.allclose(b, r, rtol=1e-12), n
    assert model[1].num_batches_tracked.item() == 2
    dropout = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4)).double().train()
    batch = (torch.randn(16, 6, dtype=torch.float64), torch.arange(16) % 4)
    task_i, task_j = (batch[0][:8], batch[1][:8]), (batch[0][8:], batch[1][8:])
    exact, _ = gradient(dropout, task_i, task_j, second_order="exact", curvature_fraction=0.5)
    fd, _ = gradient(dropout, task_i, task_j, second_order="fd", fd_scheme="central", curvature_fraction=0.5)
    assert max_rel_err(fd, exact) < 1e-7


@pytest.mark.parametrize("speedup,chosen", [(math.inf, "fd"), (0.0, "exact")])
def test_auto_measures_with_the_sample_and_leaves_a_plain_step(speedup, chosen, monkeypatch):
    """auto's exact and fd draw the same sample (fd within its float64 error of exact, where different samples
    would be O(1) apart), and its first step is a plain step of what it chose, sample included."""
    monkeypatch.setattr(timm_mltp.auto, "FD_SPEEDUP", speedup)
    model = smooth_net_without_bn()
    plain = copy.deepcopy(model)
    auto, stats = gradient(model, *tasks(), curvature_fraction=0.5, auto_timing=True)
    check = second_order_check(model, MLTPConfig(gamma=0.4, curvature_fraction=0.5))
    assert stats.second_order == chosen == check.choice and check.fd_error < 1e-4
    expected, plain_stats = gradient(plain, *tasks(), second_order=chosen, curvature_fraction=0.5)
    assert all(torch.equal(auto[n], expected[n]) for n in auto)
    assert stats.second_order_share == plain_stats.second_order_share


def test_tasks_of_dicts_take_the_same_rows_of_every_tensor(monkeypatch):
    def by_dict(module, batch):
        return F.cross_entropy(module(batch["pixels"]), batch["labels"])

    model = small_net()
    (x_i, y_i), (x_j, y_j) = tasks()
    drawn = recorded_rows(monkeypatch)
    model.zero_grad(set_to_none=True)
    mltp_backward(model, {"pixels": x_i, "labels": y_i, "name": "task i"}, {"pixels": x_j, "labels": y_j}, by_dict,
                  MLTPConfig("full", gamma=0.4, second_order="exact", curvature_fraction=0.5), 0.3)
    got = {n: p.grad for n, p in model.named_parameters()}
    sample = (x_i[drawn[0]], y_i[drawn[0]])
    expected = sampled_reference(model, (x_i, y_i), (x_j, y_j), sample, select_parameters(model, "full"), 0.3, 0.4)
    assert max_rel_err(got, expected) < 1e-10


def test_curvature_fraction_outside_0_1_is_a_clear_error():
    for bad in (0, 0.0, -0.5, 1.5, math.nan, True, "0.5"):
        with pytest.raises(MLTPConfigError, match=r"curvature_fraction must be a number in \(0, 1\]"):
            MLTPConfig(curvature_fraction=bad)


# ---- @once_differentiable: no double backward, and no error from autograd either

class OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        return grad * (1 - y * y)


class NetWithOnceDifferentiable(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(OnceDifferentiableTanh.apply(self.a(x)))


def test_torch_silently_drops_the_second_derivative_of_once_differentiable_functions():
    """What torch does (2.14): double backward through such a function raises nothing, its part is zero."""
    model = NetWithOnceDifferentiable().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 4
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    silent = torch.autograd.grad(sum(t.sum() for t in g), params, allow_unused=True)
    model.forward = lambda x: model.b(torch.tanh(model.a(x)))
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    true = torch.autograd.grad(sum(t.sum() for t in g), params)
    assert (silent[0] is None or (silent[0] - true[0]).norm() > 0.1 * true[0].norm())


def test_exact_refuses_once_differentiable_and_auto_runs_fd(caplog):
    batch = (torch.randn(16, 6, dtype=torch.float64), torch.arange(16) % 4)
    task_i, task_j = (batch[0][:8], batch[1][:8]), (batch[0][8:], batch[1][8:])
    for rho in (1.0, 0.5):
        model = NetWithOnceDifferentiable().double()
        with pytest.raises(MLTPConfigError, match="OnceDifferentiableTanh.*once_differentiable"):
            gradient(model, task_i, task_j, second_order="exact", curvature_fraction=rho)
        with caplog.at_level(logging.INFO, logger="timm_mltp"):
            _, stats = gradient(model, task_i, task_j, curvature_fraction=rho)
        assert stats.second_order == "fd"
        check = second_order_check(model, MLTPConfig(gamma=0.4, curvature_fraction=rho))
        assert "OnceDifferentiableTanh" in check.exact
        assert any("OnceDifferentiableTanh" in r.getMessage() for r in caplog.records)


def test_recipe_and_trainer_pass_the_option_on(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "recipes"))
    from train import parse_args
    from timm_mltp.build import mltp_config
    from timm_mltp.trainer import MLTPTrainingArguments
    assert mltp_config(parse_args(["--curvature-fraction", "0.25"])).curvature_fraction == 0.25
    assert mltp_config(parse_args([])).curvature_fraction == 1.0
    args = MLTPTrainingArguments(output_dir=str(tmp_path), mltp_curvature_fraction=0.125, report_to=[])
    assert args.mltp_config.curvature_fraction == 0.125
    with pytest.raises(MLTPConfigError, match="curvature_fraction must be"):
        MLTPTrainingArguments(output_dir=str(tmp_path), mltp_curvature_fraction=2.0, report_to=[])
