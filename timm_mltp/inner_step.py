"""The inner step size alpha (SPEC.md, The objective): a rule, turned into a number every step.

    lr        alpha_g = alpha_scale * lr_g                         lr_g: the current learning rate of
                                                                   parameter group g (warmup, decay, layer decay)
    fixed     alpha   = alpha
    clip      alpha_g = alpha_scale * lr_g * min(1, c / ||g_i||)  c: the outer step's max gradient norm, and
                                                                   ||g_i|| over every trainable parameter, the
                                                                   norm the outer step's clipping reads: the
                                                                   inner step on S is the clipped SGD step of
                                                                   task i, restricted to S
    update    alpha_g = alpha_scale * ||dw_Sg|| / ||P_Sg g_i||      dw_Sg: the last actual update of S in group g
                                                                   (after clipping, momentum, Adam's scaling);
                                                                   rule `clip` until the first update
    relative  alpha   = relative_step * ||w_S|| / ||P_S g_i||        a fixed relative length of the inner step
    preconditioned                                                 per element: the direction of the step
              alpha   = c_g / sqrt(v_hat + eps_g^2)                the optimizer itself would take on g_i
              c_g: ||alpha P_Sg g_i|| = alpha_scale * ||dw_Sg||     alone (Adam without momentum; v_hat its
                                                                   bias-corrected second moment, `exp_avg_sq`),
                                                                   at the length of its last actual update.
                                                                   Fallbacks: `clip` before the first update
                                                                   and for groups without a second moment
                                                                   (SGD); `update` for adaptive ones without
                                                                   (Lion, Adafactor's factored state)
    online    alpha   = s_t * (rule preconditioned, alpha_scale 1) s_t adapted every pair from the measured
                                                                   cosine c of P_S g_i and P_S g_j':
                                                                   s *= ONLINE_RATE if c > 0 (g_j' still
                                                                   agrees with g_i: the step is short), else
                                                                   s /= ONLINE_RATE (past task j's descent
                                                                   along g_i: overshoot); s starts at
                                                                   alpha_scale, stays in ONLINE_BOUNDS,
                                                                   is logged and checkpointed
    optimizer (default) per group: `preconditioned` where the optimizer is adaptive (Adam, AdamW, LAMB,
              RMSprop, ...: groups with `betas` or `eps`), whose one-step length momentum does not inflate;
              `clip` elsewhere (SGD), where the last update is mostly momentum, up to 1/(1-momentum) times one
              step. Until 2026-12-01 (issue 16) adaptive groups took `update`: the raw gradient at the last
              update's length, which lost 6.5 points under AdamW (docs/generalization.md, setting adamw)

alpha is a constant of the step: it is computed from detached norms, no gradient flows through it.
Every rule reads the unscaled gradient of task i (fp16: the loss scale is divided out).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .mltp import MLTPConfig, alpha_from_optimizer
from .selection import select_parameters


# the rules that precondition Adam-type groups (and clip SGD groups)
_PRECONDITIONED = ("optimizer", "preconditioned", "online")
# rule online: the factor per pair, and the range of s_t (times the preconditioned step)
ONLINE_RATE = 1.05
ONLINE_BOUNDS = (1e-3, 1.0)


class InnerStepSize:
    """alpha for `mltp_backward`, from `cfg.alpha_rule`, the optimizer and the outer step's clipping.

    Call `alpha()` before each pair's `mltp_backward`, and `before_optimizer_step()` right before the
    optimizer steps (the `update` rule and the `update_ratio` diagnostic measure the update it takes).
    """

    def __init__(self, cfg: MLTPConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 max_grad_norm: float | None = None):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.max_grad_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else None
        self.last_update: dict[int, float] = {}   # parameter group -> ||dw|| of its tensors in S, last update
        self._before: list[torch.Tensor] | None = None   # the weights right before the optimizer step
        self._params: list[nn.Parameter] = []          # S, as the optimizer holds it
        self._pending = False
        self.s_names = set(select_parameters(model, cfg.variant)) if cfg.variant != "none" else set()
        self.step_norms: dict[str, float] | None = None   # ||alpha P_S g_i|| per tensor of the last call, if known
        # rules optimizer/preconditioned/online: D per tensor, kept between steps (the step's alpha, written anew
        # each step: a fresh parameter-sized allocation costs more than the arithmetic, page faults on the CPU)
        self._directions: dict[str, torch.Tensor] = {}
        self.online_scale = min(max(cfg.alpha_scale, ONLINE_BOUNDS[0]), ONLINE_BOUNDS[1])   # rule online: s_t

    # ---- the rule

    def alpha(self):
        """What `mltp_backward` takes this step: a float, {name: float}, or this object (rules on norms)."""
        self._measure_update()
        if self.cfg.alpha_rule == "fixed":
            return self.cfg.alpha
        if self.cfg.alpha_rule == "lr":
            return alpha_from_optimizer(self.model, self.optimizer, self.cfg.alpha_scale)
        return self

    @property
    def uses_gradient_norm(self) -> bool:
        """Whether `mltp_backward` must pass ||g_i|| over every trainable parameter: the outer step clips and the
        clipped step is used (rule clip; update and optimizer before the first update; optimizer on SGD-type
        groups; preconditioned and online before the first update). Exact second order on a subset S
        pays one more backward for it, so only then."""
        rule = self.cfg.alpha_rule
        if self.max_grad_norm is None or rule not in ("clip", "update", *_PRECONDITIONED):
            return False
        if rule == "clip" or not self.last_update:
            return True
        return rule in _PRECONDITIONED and not all(_is_adaptive(group) for group in self.optimizer.param_groups)

    @property
    def uses_gradients(self) -> bool:
        """Whether `mltp_backward` must pass task i's unscaled gradient of S itself (rules optimizer,
        preconditioned and online on Adam-type groups after the first update: the length of D P_S g_i; under
        fp16 that is an unscaled copy of it, so only then)."""
        return (self.cfg.alpha_rule in _PRECONDITIONED and bool(self.last_update)
                and any(_is_adaptive(group) for group in self.optimizer.param_groups))

    def __call__(self, grad_norms: dict[str, float], weight_norms: dict[str, float],
                 gradient_norm: float | None = None, gradients: dict | None = None) -> dict:
        """alpha per parameter of S from the unscaled norms of P_S g_i and w_S per tensor, and ||g_i|| over every
        trainable parameter (`gradient_norm`; where not given, S is every trainable parameter); `gradients`:
        P_S g_i per tensor, unscaled, where `uses_gradients`."""
        rule = self.cfg.alpha_rule
        self.step_norms = None
        if rule == "relative":
            g_norm = _total(grad_norms.values())
            alpha = self.cfg.relative_step * _total(weight_norms.values()) / g_norm if g_norm > 0 else 0.0
            return dict.fromkeys(grad_norms, alpha)
        clipped = self._clipped_lr(grad_norms, gradient_norm)
        if rule in _PRECONDITIONED:   # optimizer: Adam-type groups preconditioned, SGD groups clip
            return self._preconditioned(grad_norms, clipped, gradients)
        if rule == "clip" or not self.last_update:   # rule update: clip until the first update
            return clipped
        return self._as_long_as_last_update(grad_norms, self._group_of_name())

    def _preconditioned(self, grad_norms: dict[str, float], clipped: dict[str, float], gradients: dict) -> dict:
        """Rules preconditioned and online: per element 1 / sqrt(v_hat + eps_g^2), Adam's direction for g_i without
        momentum, scaled per group to the length of the group's last update; the fallbacks elsewhere."""
        online = self.cfg.alpha_rule == "online"
        scale = self.online_scale if online else self.cfg.alpha_scale
        rescale = scale / max(self.cfg.alpha_scale, 1e-30) if online else 1.0   # fallbacks carry alpha_scale
        if not self.last_update:
            return {n: a * rescale for n, a in clipped.items()}
        params = dict(self.model.named_parameters())
        group_of = self._group_of_name()
        updated = self._as_long_as_last_update(grad_norms, group_of)
        alpha, preconditioned = {}, []
        for name in grad_norms:
            k = group_of[name]
            group = self.optimizer.param_groups[k] if k >= 0 else {}
            direction = _adam_direction(self.optimizer.state.get(params[name], {}), group, params[name],
                                        self._directions.get(name)) if _is_adaptive(group) else None
            if direction is not None:
                alpha[name] = self._directions[name] = direction
                preconditioned.append(name)
            elif _is_adaptive(group):
                alpha[name] = updated[name] * rescale
            else:
                alpha[name] = clipped[name] * rescale
        if preconditioned:   # per group: ||D P_Sg g_i|| = scale * ||last update of S in g||
            norms = torch.stack(torch._foreach_norm(torch._foreach_mul(
                [alpha[n] for n in preconditioned], [gradients[n] for n in preconditioned]))).double().tolist()
            squares: dict[int, float] = {}
            for name, norm in zip(preconditioned, norms):
                squares[group_of[name]] = squares.get(group_of[name], 0.0) + norm * norm
            lengths = {}
            for name, norm in zip(preconditioned, norms):
                k = group_of[name]
                factor = scale * self.last_update.get(k, 0.0) / math.sqrt(squares[k]) if squares[k] > 0 else 0.0
                alpha[name].mul_(factor)
                lengths[name] = norm * factor
            # ||alpha P_S g_i|| per tensor, which mltp_backward would otherwise measure again (a pass over S)
            self.step_norms = {n: lengths[n] if n in lengths else alpha[n] * grad_norms[n] for n in grad_norms}
        return alpha

    def observe(self, grad_cosine: float) -> None:
        """Rule online: adapt s_t from the cosine of P_S g_i and P_S g_j' this pair measured."""
        if self.cfg.alpha_rule != "online" or not math.isfinite(grad_cosine):
            return
        factor = ONLINE_RATE if grad_cosine > 0 else 1 / ONLINE_RATE
        self.online_scale = min(max(self.online_scale * factor, ONLINE_BOUNDS[0]), ONLINE_BOUNDS[1])

    def _clipped_lr(self, grad_norms: dict[str, float], gradient_norm: float | None) -> dict[str, float]:
        """Rule clip: the learning rate, times the factor the outer step's norm clipping would apply to g_i."""
        g_norm = _total(grad_norms.values()) if gradient_norm is None else gradient_norm
        clip = min(1.0, self.max_grad_norm / g_norm) if self.max_grad_norm and g_norm > 0 else 1.0
        lr = alpha_from_optimizer(self.model, self.optimizer, self.cfg.alpha_scale * clip)
        return {name: lr[name] for name in grad_norms}

    def _as_long_as_last_update(self, grad_norms: dict[str, float], group_of: dict[str, int]) -> dict[str, float]:
        """Rule update: per parameter group, ||alpha P_Sg g_i|| = alpha_scale * ||last update of S in g||."""
        squares: dict[int, float] = {}
        for name, norm in grad_norms.items():
            squares[group_of[name]] = squares.get(group_of[name], 0.0) + norm * norm
        alpha = {k: self.cfg.alpha_scale * self.last_update.get(k, 0.0) / math.sqrt(sq) if sq > 0 else 0.0
                 for k, sq in squares.items()}
        return {name: alpha[group_of[name]] for name in grad_norms}

    def _group_of_name(self) -> dict[str, int]:
        group_of = {id(p): k for k, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
        return {n: group_of.get(id(p), -1) for n, p in self.model.named_parameters()}

    # ---- the last actual update

    def before_optimizer_step(self) -> None:
        """Keep the weights as they are now; the next `alpha()` measures the update the optimizer made."""
        in_s = {id(p) for n, p in self.model.named_parameters() if n in self.s_names and p.requires_grad}
        self._params = [p for group in self.optimizer.param_groups for p in group["params"] if id(p) in in_s]
        if not self._params:
            return
        with torch.no_grad():
            if self._before is None or [b.shape for b in self._before] != [p.shape for p in self._params]:
                self._before = [p.detach().clone() for p in self._params]
            else:
                torch._foreach_copy_(self._before, [p.detach() for p in self._params])
        self._pending = True

    def _measure_update(self) -> None:
        if not self._pending:
            return
        self._pending = False
        with torch.no_grad():
            torch._foreach_sub_(self._before, [p.detach() for p in self._params])   # -(the update), in place
            norms = torch.stack(torch._foreach_norm(self._before)).double().tolist()
        group_of = {id(p): k for k, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
        squares: dict[int, float] = {}
        for p, norm in zip(self._params, norms):
            squares[group_of[id(p)]] = squares.get(group_of[id(p)], 0.0) + norm * norm
        if any(squares.values()):   # a skipped step (fp16 overflow) moved nothing: keep the last real update
            self.last_update = {k: math.sqrt(v) for k, v in squares.items()}

    def update_ratio(self, inner_step: float) -> float:
        """||alpha P_S g_i|| / ||last actual update of S||; nan before the first update."""
        self._measure_update()
        last = _total(self.last_update.values())
        return inner_step / last if last > 0 else math.nan

    # ---- checkpoints: the `update` rule's memory goes with the optimizer's

    def state_dict(self) -> dict:
        self._measure_update()
        return {"alpha_rule": self.cfg.alpha_rule, "last_update": dict(self.last_update),
                "online_scale": self.online_scale}

    def load_state_dict(self, state: dict) -> None:
        self.last_update = {int(k): float(v) for k, v in state.get("last_update", {}).items()}
        self.online_scale = float(state.get("online_scale", self.online_scale))


def _is_adaptive(group: dict) -> bool:
    """Whether a parameter group's optimizer scales each step itself (Adam's family, RMSprop, LAMB, ...)."""
    return "betas" in group or "eps" in group


def _adam_direction(state: dict, group: dict, param: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor | None:
    """1 / sqrt(v_hat + eps^2) per element, up to a constant factor (a new tensor): Adam's scaling of a gradient,
    v_hat the optimizer's bias-corrected second moment, eps inside the root (within eps of Adam's
    1 / (sqrt(v_hat) + eps); one pass fewer). The factor is sqrt(1 - beta2^t), left in: the caller sets the
    step's length. None where the optimizer holds no second moment of the parameter's shape (no state yet, SGD,
    Adafactor's factored rows and columns). Written into `out` where it fits."""
    v = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
    v = state.get("exp_avg_sq") if v is None else v
    if not isinstance(v, torch.Tensor) or v.shape != param.shape:
        return None
    step = float(state.get("step", 0))
    beta2 = group.get("betas", (0.9, 0.999))[1]
    correction = 1 - beta2 ** step if step > 0 else 1.0
    eps = group.get("eps", 1e-8)
    # v / c + eps^2 = (v + c eps^2) / c: the rsqrt of v + c eps^2 is the direction times sqrt(c)
    v = v.detach().to(param.dtype)
    if out is None or out.shape != v.shape or out.dtype != v.dtype or out.device != v.device:
        out = torch.empty_like(v)
    return torch.add(v, correction * eps * eps, out=out).rsqrt_()


def _total(norms) -> float:
    return math.sqrt(sum(x * x for x in norms))
