"""The inner step size alpha: each rule against hand computation, through the one MLTP step (timm_mltp/step.py),
and the rule's memory kept across a checkpoint (SPEC.md, The objective)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

from timm_mltp import MLTPConfig, MLTPStep, mltp_backward, split_tasks
from timm_mltp.engine import TrainArgs, Trainer


def ce(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().train()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def task_i_grads(model, data):
    """grad L_i of every parameter, by plain autograd (task i: the first half of the batch)."""
    x, y = data
    loss = F.cross_entropy(model(x[:4]), y[:4])
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


def norm(tensors):
    return math.sqrt(sum(t.pow(2).sum().item() for t in tensors))


def two_group_sgd(model, **kwargs):
    """Layer 0 at lr 0.2, layer 2 at lr 0.05: each group gets its own inner step."""
    return torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.2},
                            {"params": model[2].parameters(), "lr": 0.05}], **kwargs)


def mltp_step(model, optimizer, max_grad_norm=None, **cfg):
    return MLTPStep(Accelerator(cpu=True), model, optimizer, MLTPConfig(variant="full", **cfg), ce,
                    max_grad_norm=max_grad_norm)


def train_step(step, optimizer, data):
    optimizer.zero_grad(set_to_none=True)
    stats = step.pair(data)
    assert step.sync()
    optimizer.step()
    return stats


def test_rule_lr_is_each_groups_learning_rate_times_the_scale():
    model = net()
    stats = mltp_step(model, two_group_sgd(model), alpha_rule="lr", alpha_scale=2.0).pair(batch())
    n0, n2 = sum(p.numel() for p in model[0].parameters()), sum(p.numel() for p in model[2].parameters())
    assert stats.alpha == pytest.approx((0.4 * n0 + 0.1 * n2) / (n0 + n2), rel=1e-12)
    g = task_i_grads(net(), batch())
    expected = math.hypot(0.4 * norm([g["0.weight"], g["0.bias"]]), 0.1 * norm([g["2.weight"], g["2.bias"]]))
    assert stats.inner_step == pytest.approx(expected, rel=1e-9)


def test_rule_fixed():
    model = net()
    stats = mltp_step(model, two_group_sgd(model), alpha_rule="fixed", alpha=0.03).pair(batch())
    assert stats.alpha == 0.03
    assert stats.inner_step == pytest.approx(0.03 * norm(task_i_grads(net(), batch()).values()), rel=1e-9)


@pytest.mark.parametrize("max_norm", [None, 1e-3, 1e3])
def test_rule_clip_clips_the_inner_gradient_as_the_outer_one(max_norm):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = mltp_step(model, opt, max_grad_norm=max_norm, alpha_rule="clip").pair(batch())
    g_norm = norm(task_i_grads(net(), batch()).values())
    factor = min(1.0, max_norm / g_norm) if max_norm else 1.0
    assert stats.alpha == pytest.approx(0.1 * factor, rel=1e-9)
    assert stats.inner_step == pytest.approx(0.1 * min(g_norm, max_norm or math.inf), rel=1e-9)


def relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double().train()


@pytest.mark.parametrize("make", [net, relu_net], ids=["tanh", "relu"])
@pytest.mark.parametrize("second_order", ["exact", "fd"])
@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_rule_clip_on_a_subset_reads_the_whole_gradients_norm_as_the_outer_clipping_does(second_order, max_norm,
                                                                                         make):
    """S = the last layer only: the clip factor is the one the outer step's clipping would give task i's whole
    gradient, so the inner step on S is the clipped SGD step restricted to S (not P_S g_i clipped on its own)."""
    model = make()
    cfg = MLTPConfig(variant="2.*", second_order=second_order, alpha_rule="clip")
    step = MLTPStep(Accelerator(cpu=True), model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, ce,
                    max_grad_norm=max_norm)
    stats = step.pair(batch())
    g = task_i_grads(make(), batch())
    g_norm, g_s_norm = norm(g.values()), norm([g["2.weight"], g["2.bias"]])
    assert g_s_norm < 0.9 * g_norm and g_norm > 1e-3          # the two clip factors differ at max_norm 1e-3
    factor = min(1.0, max_norm / g_norm)
    assert stats.alpha == pytest.approx(0.1 * factor, rel=1e-9)
    assert stats.inner_step == pytest.approx(0.1 * factor * g_s_norm, rel=1e-9)
    # reading the rest of g_i changes alpha only: the gradient is the one that alpha, given as a number, gives
    reference = make()
    mltp_backward(reference, *split_tasks(batch()), ce, cfg, 0.1 * factor)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_the_whole_gradients_norm_is_asked_for_only_where_a_clipped_step_is_used():
    """Exact second order on a subset pays one more backward for ||g_i||: only under clipping, and not once
    Adam-type groups follow their last update."""
    model = net()
    sgd = mltp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=1.0).inner_step
    adam_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    adam = mltp_step(model, adam_opt, max_grad_norm=1.0)
    unclipped = mltp_step(model, torch.optim.SGD(model.parameters(), lr=0.1)).inner_step
    assert sgd.uses_gradient_norm and adam.inner_step.uses_gradient_norm and not unclipped.uses_gradient_norm
    train_step(adam, adam_opt, batch())
    adam.inner_step.alpha()                        # measures the update the optimizer made
    assert adam.inner_step.last_update and not adam.inner_step.uses_gradient_norm


@pytest.mark.parametrize("target", [1e-4, 3e-2])
def test_rule_relative_holds_the_inner_steps_relative_length(target):
    model = net()
    step = mltp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), alpha_rule="relative",
                     relative_step=target)
    for seed in range(3):
        w_norm = norm([p.detach() for p in model.parameters()])
        stats = train_step(step, step.inner_step.optimizer, batch(seed))
        assert stats.relative_step == pytest.approx(target, rel=1e-9)
        assert stats.inner_step == pytest.approx(target * w_norm, rel=1e-9)


def test_rule_update_matches_each_groups_last_update():
    model = net()
    opt = two_group_sgd(model, momentum=0.9)
    step = mltp_step(model, opt, alpha_rule="update", alpha_scale=1.0)
    first = train_step(step, opt, batch(0))
    assert first.update_ratio != first.update_ratio            # nan: no update yet (the first step is `clip`)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(step, opt, batch(1))
    update = [p.detach() - b for p, b in zip(model.parameters(), before)]
    g = task_i_grads(model, batch(2))
    stats = step.pair(batch(2))
    # per group: ||alpha_g P_Sg g_i|| = ||last update of the group||
    alpha0 = norm(update[:2]) / norm([g["0.weight"], g["0.bias"]])
    alpha2 = norm(update[2:]) / norm([g["2.weight"], g["2.bias"]])
    n0, n2 = sum(p.numel() for p in model[0].parameters()), sum(p.numel() for p in model[2].parameters())
    assert stats.alpha == pytest.approx((alpha0 * n0 + alpha2 * n2) / (n0 + n2), rel=1e-9)
    assert stats.inner_step == pytest.approx(norm(update), rel=1e-9)
    assert stats.update_ratio == pytest.approx(1.0, rel=1e-9)


def test_rule_optimizer_is_clip_for_sgd_and_preconditioned_for_adam():
    model = net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = mltp_step(model, sgd, max_grad_norm=0.01)             # the default rule
    assert step.cfg.alpha_rule == "optimizer"
    train_step(step, sgd, batch(0))
    stats = step.pair(batch(1))
    assert stats.inner_step == pytest.approx(0.1 * 0.01, rel=1e-9)   # lr x the clipped gradient; momentum aside
    results = {}
    for rule in ("optimizer", "preconditioned", "update"):
        model = net()
        adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
        step = mltp_step(model, adam, alpha_rule=rule)
        train_step(step, adam, batch(0))
        adam.zero_grad(set_to_none=True)
        stats = step.pair(batch(1))
        assert stats.update_ratio == pytest.approx(1.0, rel=1e-9)    # as long as Adam's last step
        results[rule] = stats.alpha, [p.grad.clone() for p in model.parameters()]
    # Adam's direction, not the raw gradient's. Two separate runs: this CPU's float64 kernels round differently
    # with memory alignment, which Adam's 1/sqrt(v) turns into ~1e-8 differences after one step
    assert results["optimizer"][0] == pytest.approx(results["preconditioned"][0], rel=1e-6)
    for a, b in zip(results["optimizer"][1], results["preconditioned"][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert results["optimizer"][0] != pytest.approx(results["update"][0], rel=1e-3)


def test_a_skipped_step_keeps_the_last_real_update():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = mltp_step(model, opt, alpha_rule="update")
    train_step(step, opt, batch(0))
    train_step(step, opt, batch(1))
    step.pair(batch(2))
    kept = dict(step.inner_step.last_update)
    step.sync()                                                # then the optimizer does nothing (a skipped step)
    step.pair(batch(3))
    assert step.inner_step.last_update == kept


def test_the_rules_memory_is_saved_and_restored_with_a_recipe_checkpoint(tmp_path):
    args = dict(model="test_resnet", epochs=1, batch_size=8, max_train_samples=64, workers=0, output=str(tmp_path),
                experiment="rule", progress=False, alpha_rule="update")
    first = Trainer(TrainArgs(**args))
    first.fit()
    saved = first.step.inner_step.state_dict()
    assert saved["alpha_rule"] == "update" and saved["last_update"] and all(v > 0 for v in saved["last_update"].values())
    resumed = Trainer(TrainArgs(**args, resume=str(tmp_path / "rule" / "last.pth.tar")))
    assert resumed.step.inner_step.last_update == saved["last_update"]


def adam_direction_by_hand(opt, param):
    """1 / sqrt(v_hat + eps^2) from the optimizer's state, written out."""
    state, group = opt.state[param], opt.param_groups[0]
    v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
    return 1 / (v_hat + group["eps"] ** 2).sqrt()


def preconditioned_by_hand(model, opt, g, length):
    """D = c / sqrt(v_hat + eps^2), c such that ||D g_i|| = length."""
    direction = {n: adam_direction_by_hand(opt, p) for n, p in model.named_parameters()}
    c = length / norm([direction[n] * g[n] for n in g])
    return {n: c * d for n, d in direction.items()}


@pytest.mark.parametrize("second_order", ["exact", "fd"])
def test_rule_preconditioned_is_adams_direction_at_the_length_of_its_last_update(second_order):
    """Per element alpha = c / sqrt(v_hat + eps^2): the direction AdamW would step in on g_i alone (without
    momentum), at alpha_scale times the length of its last update; the clipped SGD step before that."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    step = mltp_step(model, opt, max_grad_norm=0.5, alpha_rule="preconditioned", alpha_scale=0.3,
                     second_order=second_order)
    first = train_step(step, opt, batch(0))                      # no update yet: 0.3 lr x the clipped gradient
    g = task_i_grads(net(), batch(0))
    assert first.inner_step == pytest.approx(0.3 * 1e-2 * min(1.0, 0.5 / norm(g.values())) * norm(g.values()),
                                             rel=1e-9)
    train_step(step, opt, batch(1))
    before = [p.detach().clone() for p in model.parameters()]
    train_step(step, opt, batch(2))
    last_update = norm([p.detach() - b for p, b in zip(model.parameters(), before)])
    g = task_i_grads(model, batch(3))
    alpha = preconditioned_by_hand(model, opt, g, 0.3 * last_update)
    opt.zero_grad(set_to_none=True)
    stats = step.pair(batch(3))
    assert stats.inner_step == pytest.approx(0.3 * last_update, rel=1e-9)
    assert stats.update_ratio == pytest.approx(0.3, rel=1e-9)
    assert stats.alpha == pytest.approx(sum(a.sum().item() for a in alpha.values()) /
                                        sum(p.numel() for p in model.parameters()), rel=1e-9)
    # the gradient is mltp_backward's with that D given as tensors
    reference = net()
    reference.load_state_dict(model.state_dict())
    mltp_backward(reference, *split_tasks(batch(3)), ce, MLTPConfig(variant="full", second_order=second_order), alpha)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)


def test_rule_preconditioned_falls_back_to_clip_on_sgd_groups():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = mltp_step(model, opt, max_grad_norm=0.01, alpha_rule="preconditioned")
    train_step(step, opt, batch(0))
    stats = step.pair(batch(1))
    assert stats.inner_step == pytest.approx(0.1 * 0.01, rel=1e-9)


def test_rule_online_adapts_its_scale_from_the_cosine_and_keeps_it_across_a_checkpoint():
    from timm_mltp.inner_step import ONLINE_BOUNDS, ONLINE_RATE
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = mltp_step(model, opt, alpha_rule="online", alpha_scale=0.1)
    rule = step.inner_step
    scale = 0.1
    for seed in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        stats = train_step(step, opt, batch(seed))
        scale *= ONLINE_RATE if stats.grad_cosine > 0 else 1 / ONLINE_RATE
        assert rule.online_scale == pytest.approx(scale, rel=1e-12)
    last_update = norm([p.detach() - b for p, b in zip(model.parameters(), before)])
    stats = step.pair(batch(9))                  # s_t times the preconditioned step at the last update's length
    assert stats.inner_step == pytest.approx(scale * last_update, rel=1e-9)
    for cosine in (1.0,) * 200:
        rule.observe(cosine)
    assert rule.online_scale == ONLINE_BOUNDS[1]
    for cosine in (-1.0,) * 400:
        rule.observe(cosine)
    assert rule.online_scale == ONLINE_BOUNDS[0]
    restored = mltp_step(net(), opt, alpha_rule="online", alpha_scale=0.1).inner_step
    restored.load_state_dict(rule.state_dict())
    assert restored.online_scale == ONLINE_BOUNDS[0]
