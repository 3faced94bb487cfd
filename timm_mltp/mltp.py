"""The MLTP objective and its gradient (SPEC.md), in one place.

    L_i(w)    = loss(f(x_i; w), y_i)
    w'        = w - alpha * P_S grad L_i(w)                   # inner step on the selected set S
    L_MLTP(w) = (1 - gamma) * L_i(w) + gamma * L_j(w')

`mltp_backward` accumulates grad L_MLTP into every trainable parameter's `.grad`,
like `loss.backward()`. Four ways to get it, one function each:

    none   S empty: (1-gamma) g_i + gamma g_j at w                 2 fwd + 2 bwd
    first  `fo`: w' is a constant, (1-gamma) g_i + gamma g_j'      2 fwd + 2 bwd
    exact  double backward through the inner gradient of S         2 fwd + 2 bwd + double bwd of S
    fd     (1-gamma) g_i + gamma (g_j' - H_i v), v = alpha P_S g_j',
           H_i v from gradients of L_i at w + r v (and w - r v)    3 (4) fwd + 3 (4) bwd

Curvature from a sample (`curvature_fraction` rho < 1): only H_i v needs second derivatives, and H_i is a
mean over task i's samples, so exact and fd take it on a random rho-fraction of task i (unbiased, about rho of
its cost); g_i and w' keep every sample:

    exact  H v = grad_w <alpha P_S g_sample(w), P_S g_j'> (g_j' a constant)   + 1 fwd + double bwd, on the sample
    fd     H v from gradients of the sample at w + r v and w (or w - r v)     + 2 fwd + 2 bwd, on the sample

`auto` runs both on its first step, from the same state, and keeps exact wherever double backward works, fd
where it does not; with `auto_timing` it keeps fd where fd lands within FD_TOLERANCE of exact and is faster
(timm_mltp/auto.py); fd alone (exact unavailable, or asked for) is checked for kinks once.
"""
from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .auto import FD_SPEEDUP, FD_TOLERANCE, KINK_TOLERANCE, SecondOrderCheck, checked_fd, first_line, probe, report
from .double_backward import is_double_backward_error, once_differentiable_in, twice_differentiable
from .errors import MLTPConfigError
from .passes import (evaluated_at, frozen_running_stats, parameter_holders, replayed_rng, restore_state, rng_devices,
                     rng_state, state_of)
from .selection import select_parameters
from .tasks import rows_of, split_tasks, task_size

_logger = logging.getLogger("timm_mltp")

SECOND_ORDER = ("auto", "exact", "fd")
BN_UPDATE = ("both", "first")
FD_SCHEMES = ("forward", "central")
ALPHA_RULES = ("optimizer", "lr", "fixed", "clip", "update", "relative", "preconditioned", "online")

# Finite-difference step, relative to the weight norm of S: ||r v|| = fd_eps * ||w_S|| (an absolute step
# fd_eps where ||w_S|| = 0). Measured against exact double backward on smooth timm models
# (benchmarks/fd_error.py): in float32 the forward difference is best near 1e-5 (rel. error ~3e-3), the
# central one near 1e-4 (~4e-4).
_FD_EPS = {"forward": {torch.float64: 1e-7, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2},
           "central": {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}}


def _is_number(value, low: float = 0.0) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value < math.inf


@dataclass
class MLTPConfig:
    """What MLTP does each step; see SPEC.md for every field. Checked once, here."""

    variant: str = "full"        # none | full | conv | fc | fo | head | glob patterns "layer4.*,fc.*"
    gamma: float = 0.5           # weight of task j, in (0, 1]
    second_order: str = "auto"   # auto | exact | fd
    bn_update: str = "both"      # both passes update BatchNorm running statistics, or only the first
    fd_scheme: str = "forward"   # fd: one-sided difference reusing g_i (1 extra pass) or central (2)
    fd_eps: float | None = None  # fd: step size relative to ||w_S||; None picks by dtype
    # the inner step size alpha (timm_mltp/inner_step.py turns the rule into alpha every step)
    alpha_rule: str = "optimizer"  # optimizer | lr | fixed | clip | update | relative | preconditioned | online
    alpha: float | None = None   # rule fixed: the inner step size itself
    alpha_scale: float = 1.0     # rules lr, clip, update: multiplies the step they give
    relative_step: float = 1e-3  # rule relative: ||alpha P_S g_i|| / ||w_S||
    # exact and fd: H_i v from a random fraction rho of task i (at least one sample); 1 is the plain method
    curvature_fraction: float = 1.0
    # auto: False decides without a clock (exact wherever double backward works: reproducible); True also times
    # one step of each where fd is accurate and keeps fd where faster (a seed's run may then depend on load)
    auto_timing: bool = False

    def __post_init__(self):
        if not isinstance(self.variant, str) or not self.variant.strip():
            raise MLTPConfigError(f"variant must be a non-empty string such as 'full' or 'layer4.*,fc.*', "
                                  f"got {self.variant!r}")
        if not (_is_number(self.gamma) and 0 < self.gamma <= 1):
            raise MLTPConfigError(f"gamma must be a number in (0, 1] (the weight of task j), got {self.gamma!r}; "
                                  f"0.5 weighs both tasks equally")
        for name, value, allowed in (("second_order", self.second_order, SECOND_ORDER),
                                     ("bn_update", self.bn_update, BN_UPDATE),
                                     ("fd_scheme", self.fd_scheme, FD_SCHEMES),
                                     ("alpha_rule", self.alpha_rule, ALPHA_RULES)):
            if value not in allowed:
                raise MLTPConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.fd_eps is not None and not (_is_number(self.fd_eps) and self.fd_eps > 0):
            raise MLTPConfigError(f"fd_eps must be a positive number or None (chosen by dtype), got {self.fd_eps!r}")
        if self.alpha is not None and not _is_number(self.alpha):
            raise MLTPConfigError(f"alpha (the fixed inner step size) must be a finite number >= 0 or None, "
                                  f"got {self.alpha!r}")
        if self.alpha_rule == "fixed" and self.alpha is None:
            raise MLTPConfigError("alpha_rule='fixed' needs alpha, the inner step size (e.g. alpha=0.01)")
        if self.alpha is not None and self.alpha_rule != "fixed":
            raise MLTPConfigError(f"alpha={self.alpha} is a fixed inner step size, but alpha_rule is "
                                  f"{self.alpha_rule!r}; set alpha_rule='fixed' too, or leave alpha unset")
        if not _is_number(self.alpha_scale):
            raise MLTPConfigError(f"alpha_scale must be a finite number >= 0, got {self.alpha_scale!r}")
        if not (_is_number(self.relative_step) and self.relative_step > 0):
            raise MLTPConfigError(f"relative_step must be a positive number (||inner step|| / ||w_S||, e.g. 1e-3), "
                                  f"got {self.relative_step!r}")
        if not isinstance(self.auto_timing, bool):
            raise MLTPConfigError(f"auto_timing must be True or False, got {self.auto_timing!r}")
        if self.auto_timing and self.second_order != "auto":
            raise MLTPConfigError(f"auto_timing times exact against fd for second_order='auto', but second_order "
                                  f"is {self.second_order!r}; set second_order='auto' or leave auto_timing off")
        if not (_is_number(self.curvature_fraction) and 0 < self.curvature_fraction <= 1):
            raise MLTPConfigError(f"curvature_fraction must be a number in (0, 1] (the share of task i that H_i v is "
                                  f"taken on; 1 takes all of it), got {self.curvature_fraction!r}")


@dataclass
class MLTPStats:
    """What one call of `mltp_backward` measured (unscaled by any loss scale)."""

    loss: float          # L_MLTP = (1-gamma) L_i(w) + gamma L_j(w')
    loss_i: float        # L_i(w)
    loss_j: float        # L_j(w'); at w for variant none
    grad_cosine: float   # cos(P_S g_i(w), P_S g_j(w')); over all trainable parameters for variant none
    alpha: float         # inner step size, mean over S weighted by parameter count
    inner_step: float    # ||alpha P_S g_i||, the length of the inner step
    relative_step: float  # ||alpha P_S g_i|| / ||w_S||
    second_order: str    # none | first | exact | fd: how the gradient was obtained
    update_ratio: float = math.nan  # ||alpha P_S g_i|| / ||last actual update of S||, set by MLTPStep
    # ||gamma P_S H_i v|| / ||P_S grad L_MLTP||: how much of the gradient on S the second-order term is (0 for
    # none and fo)
    second_order_share: float = 0.0

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self):
        return asdict(self).keys()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Plan:
    """The facts about one model and selection that do not change between steps."""

    names: list[str]   # trainable parameters
    params: list[nn.Parameter]
    in_s: list[bool]   # which of them are in S
    scratch: list[torch.Tensor] = field(default_factory=list)  # fo/fd: storage for w' and w + r v
    auto: dict = field(default_factory=dict)  # (device, dtype) -> the second order `auto` settled on
    checks: dict = field(default_factory=dict)  # (device, dtype) -> SecondOrderCheck, what that rests on
    once_checked: bool = False  # exact has looked for @once_differentiable functions on the model's graph
    holders: dict = field(default_factory=dict)  # names -> parameter_holders(model, names), for evaluated_at

    @property
    def s_index(self) -> list[int]:
        return [k for k, s in enumerate(self.in_s) if s]

    def at(self, model: nn.Module, names: list[str], values: list[torch.Tensor]):
        """The model evaluated with the named parameters replaced by `values` (`evaluated_at`), their holders
        found once per plan: a plan lives while the model's trainable parameters are the same objects."""
        key = tuple(names)
        if key not in self.holders:
            self.holders[key] = parameter_holders(model, names)
        return evaluated_at(model, dict(zip(names, values)), self.holders[key])

    def leaves_like(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Leaf tensors like `params` for w' (fo, fd) or w +- r v (fd). Kept between steps: a fresh
        parameter-sized allocation costs more than the arithmetic written into it (page faults)."""
        like = [(p.shape, p.dtype, p.device) for p in params]
        if [(t.shape, t.dtype, t.device) for t in self.scratch] != like:
            self.scratch = [torch.empty_like(p, requires_grad=True) for p in params]
        return self.scratch


# per model and variant: the plan, rebuilt when the model's trainable parameters are other objects
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: nn.Module, variant: str) -> _Plan:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plans = _plans.setdefault(model, {})
    plan = plans.get(variant)
    live = plan is not None and len(plan.params) == len(named) and all(
        a == n and b is p for a, b, (n, p) in zip(plan.names, plan.params, named))
    if not live:  # first use, or parameters replaced (load_state_dict(assign=True), PEFT) or frozen/unfrozen
        selected = set(select_parameters(model, variant))
        plan = plans[variant] = _Plan([n for n, _ in named], [p for _, p in named], [n in selected for n, _ in named])
    return plan


def alpha_from_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                         alpha_scale: float = 1.0) -> dict[str, float]:
    """Rule `lr`: each parameter's current learning rate times `alpha_scale`; read it every step."""
    if not _is_number(alpha_scale):
        raise MLTPConfigError(f"alpha_scale must be a finite number >= 0, got {alpha_scale!r}")
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {n: float(lr_of[id(p)]) * alpha_scale for n, p in model.named_parameters() if id(p) in lr_of}


# alpha as mltp_backward takes it: a float, {name: float or tensor} over S, or a rule called with the unscaled
# per-tensor norms {name: ||P_S g_i||} and {name: ||w||} of S that returns one of the first two. A rule with a
# true `uses_gradient_norm` attribute is also given `gradient_norm=`: the unscaled ||g_i|| over every trainable
# parameter, the norm an outer step's gradient clipping reads (it differs from ||P_S g_i|| where S is a subset);
# one with a true `uses_gradients` attribute `gradients=`: {name: P_S g_i}, unscaled, detached. A rule that has
# measured ||alpha P_S g_i|| per tensor (unscaled) for the alpha it returned may hold it in a `step_norms` mapping
# (None otherwise): the core then takes it instead of another pass over S.
# A tensor for a parameter is a per-element step size, a diagonal preconditioner D (SPEC.md, adaptive
# optimizers): w' = w - D P_S g_i, and the second-order term becomes H_i P_S D g_j'. It must broadcast to the
# parameter's shape, be finite and >= 0; like a float it is a constant of the step (used detached).
Alpha = float | Mapping[str, float | torch.Tensor] | Callable[[dict, dict], float | Mapping[str, float | torch.Tensor]]


def _uses_gradient_norm(alpha: Alpha) -> bool:
    return callable(alpha) and bool(getattr(alpha, "uses_gradient_norm", False))


@dataclass
class _Step:
    """One call of `mltp_backward`: what the four gradient functions share."""

    model: nn.Module
    plan: _Plan
    loss_fn: Callable
    cfg: MLTPConfig
    alpha: Alpha
    scale: float       # loss scale: multiplies the returned gradients; the inner step is always unscaled
    alphas: list[float | torch.Tensor] = field(default_factory=list)   # per tensor of S, by `inner_step_sizes`
    mean_alpha: float = 0.0     # alpha's mean over the elements of S
    max_alpha: float = 0.0      # and its largest element
    inner_step: float = 0.0
    relative_step: float = 0.0
    g_s_norm: float = 0.0   # ||P_S g_i|| as passed to `inner_step_sizes` (loss-scaled), for the cosine
    w_s_norm: float = 0.0   # ||w_S||, for fd's step
    second_order_share: torch.Tensor | None = None   # see MLTPStats; set by exact and fd

    @property
    def bn_first(self) -> bool:
        return self.cfg.bn_update == "first"

    def loss(self, module, batch, which: str) -> torch.Tensor:
        loss = self.loss_fn(module, batch)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            scalar = isinstance(loss, torch.Tensor) and loss.dim() == 0
            hint = " without grad (called under torch.no_grad?)" if scalar else ""
            raise MLTPConfigError(f"loss_fn(module, {which}) must return a scalar tensor that depends on the model's "
                                  f"parameters, got {got}{hint}")
        return loss

    def grad(self, loss, inputs, create_graph=False) -> list[torch.Tensor]:
        return _grad(loss, inputs, self.scale, create_graph)

    # ---- what timm_mltp/auto.py measures a step by
    @property
    def device(self) -> torch.device:
        return self.plan.params[0].device

    def exact(self, task_i, task_j):
        return _exact(self, task_i, task_j)

    def finite_difference(self, task_i, task_j):
        return _finite_difference(self, task_i, task_j)

    def fd_terms(self, task_i, task_j) -> _Terms:
        return _terms(self, task_i, task_j, "fd")

    def fd_gradient(self, terms: _Terms) -> list[torch.Tensor]:
        return _from_terms(self, terms)

    def hessian_vector_product(self, terms: _Terms, scheme: str) -> list[torch.Tensor]:
        """H_i v as `terms` has it (task i or its sample, same random state), by fd's `scheme` at its default step."""
        return _hessian_vector_product(self, terms.h_task, terms.rng_i, terms.h_g_at_w, terms.v_dir, terms.v_norms,
                                       scheme, terms.full_precision)

    def left(self):
        """What a step leaves besides its gradient: buffers, random state, the inner step's sizes, the share."""
        return state_of(self.model, rng_devices(self.plan.params)), (
            self.alphas, self.mean_alpha, self.max_alpha, self.inner_step, self.relative_step, self.second_order_share)

    def restore(self, left) -> None:
        """Back to what `left()` said: a step run since then leaves no trace."""
        restore_state(self.model, left[0], rng_devices(self.plan.params))
        (self.alphas, self.mean_alpha, self.max_alpha, self.inner_step, self.relative_step,
         self.second_order_share) = left[1]

    @property
    def needs_rest_of_g_i(self) -> bool:
        """The rule reads ||g_i|| over every trainable parameter, and S is a subset of them."""
        return _uses_gradient_norm(self.alpha) and len(self.plan.s_index) < len(self.plan.params)

    def inner_step_sizes(self, g_s: list[torch.Tensor], g_rest: list[torch.Tensor] = ()) -> list[float]:
        """alpha per tensor of S from the rule, and the inner step's length (one device sync). `g_rest`: task i's
        gradient of the trainable parameters outside S, where the rule reads ||g_i|| (`needs_rest_of_g_i`)."""
        s_names = [self.plan.names[k] for k in self.plan.s_index]
        w_s = [self.plan.params[k] for k in self.plan.s_index]
        n = len(s_names)
        # ||P_S g_i||, ||w_S|| and ||g_i|| outside S per tensor: one fused pass, one sync
        norms = _norms([*g_s, *w_s, *g_rest]).double().tolist()
        g_norms = dict(zip(s_names, (x / self.scale for x in norms[:n])))
        w_norms = dict(zip(s_names, norms[n:2 * n]))
        kwargs = {}
        if _uses_gradient_norm(self.alpha):
            kwargs["gradient_norm"] = math.sqrt(sum(x * x for x in norms[:n] + norms[2 * n:])) / self.scale
        if callable(self.alpha) and getattr(self.alpha, "uses_gradients", False):
            g_detached = [g.detach() for g in g_s]
            kwargs["gradients"] = dict(zip(s_names, g_detached if self.scale == 1.0 else
                                           torch._foreach_div(g_detached, self.scale)))
        alpha = self.alpha(g_norms, w_norms, **kwargs) if callable(self.alpha) else self.alpha
        self.alphas = _alphas(alpha, s_names, w_s)
        if any(isinstance(a, torch.Tensor) for a in self.alphas):
            # per-element alpha: ||D P_S g_i|| and alpha's sum, max and min take one more pass (and sync)
            known = getattr(self.alpha, "step_norms", None) if callable(self.alpha) else None
            step_norms = (torch.tensor([known[n] * self.scale for n in s_names], dtype=torch.float64)
                          if isinstance(known, Mapping) else _step_norms(self.alphas, [g.detach() for g in g_s]))
            summary = torch.stack([_summary(a, w).to(step_norms.device) for a, w in zip(self.alphas, w_s)])
            sums, maxes, mins = summary.T.tolist()
            self.inner_step = math.sqrt(sum(x * x for x in step_norms.double().tolist())) / self.scale
            self.mean_alpha = sum(sums) / sum(w.numel() for w in w_s)
            self.max_alpha = max(maxes)
            if not (math.isfinite(self.mean_alpha) and math.isfinite(self.max_alpha) and min(mins) >= 0):
                raise MLTPConfigError(f"alpha (a per-element inner step size) must be finite and >= 0 everywhere; "
                                      f"got values from {min(mins):.3g} to {self.max_alpha:.3g}")
        else:
            self.inner_step = math.sqrt(sum((a * g_norms[n]) ** 2 for a, n in zip(self.alphas, s_names)))
            self.mean_alpha = sum(a * w.numel() for a, w in zip(self.alphas, w_s)) / sum(w.numel() for w in w_s)
            self.max_alpha = max(self.alphas)
        w_norm = math.sqrt(sum(x * x for x in w_norms.values()))
        self.g_s_norm, self.w_s_norm = math.sqrt(sum(x * x for x in norms[:n])), w_norm
        self.relative_step = self.inner_step / w_norm if w_norm > 0 else (math.inf if self.inner_step else 0.0)
        return self.alphas


def _summary(a: float | torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """alpha's sum over the elements of w (float64), its max and its min: two passes over a tensor alpha, no copy."""
    if not isinstance(a, torch.Tensor):
        return torch.tensor([a * w.numel(), a, a], dtype=torch.float64, device=w.device)
    low, high = torch.aminmax(a)
    return torch.stack([a.sum(dtype=torch.float64) * (w.numel() / a.numel()), high.double(), low.double()])


def _alphas(alpha: float | Mapping[str, float | torch.Tensor], s_names: list[str],
            w_s: list[torch.Tensor] | None = None) -> list[float | torch.Tensor]:
    """One inner step size per tensor of S: a float, or a tensor of per-element sizes (checked for shape here,
    for values where `inner_step_sizes` measures them)."""
    if isinstance(alpha, Mapping):
        missing = [n for n in s_names if n not in alpha]
        if missing:
            raise MLTPConfigError(f"alpha has no step size for {len(missing)} parameters of S, e.g. {missing[:3]}; "
                                  f"give a float, or a mapping from every parameter name in S to a float "
                                  f"(alpha_from_optimizer builds it from the optimizer's learning rates)")
        values = [alpha[n] for n in s_names]
    else:
        values = [alpha] * len(s_names)
    out = []
    for k, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            w = None if w_s is None else w_s[k]
            if w is not None and not _broadcasts_to(v.shape, w.shape):
                raise MLTPConfigError(f"alpha for {s_names[k]} has shape {tuple(v.shape)}, which does not broadcast "
                                      f"to the parameter's shape {tuple(w.shape)}")
            out.append(v.detach())
            continue
        v = v.item() if isinstance(v, torch.Tensor) else v
        if not _is_number(v):
            raise MLTPConfigError(f"alpha (the inner step size) must be a finite number >= 0, got {v!r}")
        out.append(float(v))
    return out


def _broadcasts_to(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _step_norms(alphas: list[float | torch.Tensor], vectors: list[torch.Tensor],
                norms: torch.Tensor | None = None) -> torch.Tensor:
    """||alpha_k v_k|| per tensor k (per-element alpha: ||D v||); `norms`: the ||v_k||, where a caller has them."""
    if not any(isinstance(a, torch.Tensor) for a in alphas):
        norms = _norms(vectors) if norms is None else norms
        return norms * torch.tensor(alphas, dtype=norms.dtype, device=norms.device)
    return _norms([a * v if isinstance(a, torch.Tensor) else v * a for a, v in zip(alphas, vectors)])


def _grad(loss, inputs, scale: float, create_graph=False):
    if scale != 1.0:
        loss = loss * scale
    # backward outside autocast, as `loss.backward()` after an autocast forward: inside it the backward's
    # matrix products would run in bf16/fp16 too (autocast state is thread-local, and so is the backward)
    device = loss.device.type
    outside = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
    with outside:
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


_DOT_SMALL = 1 << 16    # elements: tensors below this size share one dot product (concatenated)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """<a, b> over two lists of tensors, differentiable: one vdot per large tensor and one for all small ones
    together (a call per tensor on a model of 100 small tensors costs more than the arithmetic)."""
    dots = [torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b) if x.numel() >= _DOT_SMALL]
    small = [(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b) if x.numel() < _DOT_SMALL]
    if small:
        xs, ys = zip(*small)
        dots.append(torch.vdot(torch.cat(xs), torch.cat(ys)))
    return torch.stack(dots).sum()


def _norms(a: list[torch.Tensor]) -> torch.Tensor:
    """The norm of each tensor, one fused call, outside any graph (no detach per tensor)."""
    with torch.no_grad():
        return torch.stack(torch._foreach_norm(a))


def _cosine(a, b, a_norm: float | None = None, b_norms: torch.Tensor | None = None) -> torch.Tensor:
    """cos(a, b). ||a|| and b's per-tensor norms where a caller has them already: on a large model each norm
    is a pass over every parameter, as long as the rest of the step's vector arithmetic."""
    a_norm = _norms(a).norm() if a_norm is None else a_norm
    b_norm = (_norms(b) if b_norms is None else b_norms).norm()
    with torch.no_grad():
        return _dot(a, b) / (a_norm * b_norm).clamp_min(1e-30)


def _mix(a: list[torch.Tensor], b: list[torch.Tensor], gamma: float, a_norm: float | None = None) -> torch.Tensor:
    """(1-gamma) a + gamma b, written into a, and cos(a, b) from three norms instead of a dot product:
    ||m||^2 = (1-gamma)^2 ||a||^2 + gamma^2 ||b||^2 + 2 gamma (1-gamma) <a, b> for the mix m. Fused norms
    read each vector once; a dot product reads two, in a Python loop over the tensors (quiet CPU, the cosine's
    part besides ||a||: 0.74 -> 0.44 ms on test_convnext, 5.3 -> 4.2 ms on resnet18). In float64 from float32
    norms the cosine is off by ~1e-6 relative to ||a|| ||b|| (tests/test_mltp.py)."""
    if not 0 < gamma < 1:               # the mix is a or b: no <a, b> in its norm
        cosine = _cosine(a, b, a_norm)
        torch._foreach_lerp_(a, b, gamma)
        return cosine
    a_norm = _norms(a).norm() if a_norm is None else a_norm
    b_norm = _norms(b).norm()
    torch._foreach_lerp_(a, b, gamma)
    m_norm = _norms(a).norm()
    a_sq, b_sq, m_sq = (torch.as_tensor(x, dtype=torch.float64, device=m_norm.device) ** 2
                        for x in (a_norm, b_norm, m_norm))
    dot = (m_sq - (1 - gamma) ** 2 * a_sq - gamma ** 2 * b_sq) / (2 * gamma * (1 - gamma))
    return (dot / (a_sq * b_sq).sqrt().clamp_min(1e-30)).clamp(-1, 1)


def _inner_step(params, grads, alphas, scale, out=None, sign: float = 1.0):
    """w' = w - sign * alpha * grad (a per-element alpha multiplies elementwise), one fused kernel per tensor,
    into `out` where given; the gradient is unscaled."""
    def moved(p, g, a, o=None):
        kw = {} if o is None else {"out": o}
        if isinstance(a, torch.Tensor):
            return torch.addcmul(p, a, g, value=-sign / scale, **kw)
        return torch.add(p, g, alpha=-sign * a / scale, **kw)

    if out is None:
        return [moved(p, g, a) for p, g, a in zip(params, grads, alphas)]
    with torch.no_grad():
        if not _fused_inner_step(params, grads, alphas, -sign / scale, out):
            for p, g, a, o in zip(params, grads, alphas, out):
                moved(p, g, a, o)
    return out


def _fused_inner_step(params, grads, alphas, factor: float, out) -> bool:
    """out = params + factor * alpha * grads in two fused calls instead of a Python loop, where the tensors are
    mostly small (the loop's per-tensor cost exceeds a second pass over them) and alpha is all floats or all
    tensors; False where it did nothing."""
    if sum(p.numel() for p in params) >= _DOT_SMALL * len(params):
        return False
    tensors = sum(isinstance(a, torch.Tensor) for a in alphas)
    if tensors not in (0, len(alphas)):
        return False
    torch._foreach_copy_(out, params)
    if tensors:
        torch._foreach_addcmul_(out, alphas, grads, value=factor)
    elif len(set(alphas)) == 1:
        torch._foreach_add_(out, grads, alpha=factor * alphas[0])
    else:
        torch._foreach_add_(out, torch._foreach_mul(grads, [factor * a for a in alphas]))
    return True


def _replace(params: list, positions: list[int], values: list) -> list:
    out = list(params)
    for k, v in zip(positions, values):
        out[k] = v
    return out


# ---- the four gradients. Each returns (grads of all trainable params, L_i, L_j, cosine); grads are
# ---- multiplied by the loss scale, the inner step always uses unscaled gradients.

def _none(step: _Step, task_i, task_j):
    model, plan = step.model, step.plan
    loss_i = step.loss(model, task_i, "task_i")
    g_i = step.grad(loss_i, plan.params)
    with frozen_running_stats(model, step.bn_first):
        loss_j = step.loss(model, task_j, "task_j")
    g_j = step.grad(loss_j, plan.params)
    cosine = _mix(g_i, g_j, step.cfg.gamma)                          # (1-gamma) g_i + gamma g_j
    return g_i, loss_i, loss_j, cosine


def _first_order(step: _Step, task_i, task_j):
    model, plan = step.model, step.plan
    loss_i = step.loss(model, task_i, "task_i")
    g_i = step.grad(loss_i, plan.params)
    alphas = step.inner_step_sizes(g_i)
    with torch.no_grad():                                            # w' = w - alpha g_i, a constant
        w_prime = _inner_step(plan.params, g_i, alphas, step.scale, out=plan.leaves_like(plan.params))
    with frozen_running_stats(model, step.bn_first), plan.at(model, plan.names, w_prime) as at_w:
        loss_j = step.loss(at_w, task_j, "task_j")
    g_j = step.grad(loss_j, w_prime)                                 # g_j' = grad L_j(w')
    cosine = _mix(g_i, g_j, step.cfg.gamma, a_norm=step.g_s_norm)    # (1-gamma) g_i + gamma g_j'; S is all
    return g_i, loss_i, loss_j, cosine


def _exact(step: _Step, task_i, task_j):
    if _sample_size(step, task_i) is not None:     # H_i v on a sample of task i
        t = _terms(step, task_i, task_j, "exact")
        return _from_terms(step, t), t.loss_i, t.loss_j, t.cosine
    model, plan = step.model, step.plan
    s_params = [plan.params[k] for k in plan.s_index]
    s_names = [plan.names[k] for k in plan.s_index]
    with twice_differentiable():            # math attention, composite hard-swish: ops that have a double backward
        loss_i = step.loss(model, task_i, "task_i")
        _refuse_once_differentiable(plan, loss_i)
        # P_S g_i with its graph: w' depends on w through it, which gives the second-order terms. The rest of
        # g_i only where the rule reads ||g_i|| (clipping): one more backward through what lies below S
        rest = [p for p, s in zip(plan.params, plan.in_s) if not s] if step.needs_rest_of_g_i else []
        g_all = step.grad(loss_i, s_params + rest, create_graph=True)
        g_s = g_all[:len(s_params)]
        alphas = step.inner_step_sizes(g_s, g_all[len(s_params):])
        del g_all                               # the rest's graph goes now; w' keeps what it needs of g_s
        w_prime = _inner_step(s_params, g_s, alphas, step.scale)                       # w' = w - alpha P_S g_i
        with frozen_running_stats(model, step.bn_first), plan.at(model, s_names, w_prime) as at_w:
            loss_j = step.loss(at_w, task_j, "task_j")
        # one backward through both tasks and the inner gradient; asking for w' too yields gamma P_S g_j'
        grads = step.grad(torch.lerp(loss_i, loss_j, step.cfg.gamma), plan.params + w_prime)
    n = len(plan.params)
    with torch.no_grad():   # on S the gradient is (1-gamma) g_i + gamma g_j' - gamma H_i v; grads[n:] = gamma g_j'
        grads_s = [grads[k].detach() for k in plan.s_index]
        term = torch._foreach_sub(torch._foreach_sub(grads_s, torch._foreach_mul([g.detach() for g in g_s],
                                                                                1 - step.cfg.gamma)), grads[n:])
        step.second_order_share = _norms(term).norm() / _norms(grads_s).norm().clamp_min(1e-30)
    return grads[:n], loss_i, loss_j, _cosine(g_s, grads[n:], a_norm=step.g_s_norm)


def _refuse_once_differentiable(plan: _Plan, loss: torch.Tensor) -> None:
    """Exact's first pass on a model: a function marked @once_differentiable on its graph would make its part of
    the second-order term silently zero. An error that `auto` reads as "no double backward" (it runs fd) and
    second_order='exact' turns into MLTPConfigError."""
    if plan.once_checked:
        return
    names = once_differentiable_in(loss)
    if names:
        raise RuntimeError(f"cannot differentiate twice through {', '.join(names)}: an autograd Function marked "
                           f"@once_differentiable, whose part of the second derivative would silently be zero")
    plan.once_checked = True


def _sample_size(step: _Step, task_i) -> int | None:
    """How many of task i's samples H_i v is taken on: round(rho B), at least one (two where BatchNorm normalises
    with batch statistics: one sample has none at 1x1); None where that is all B."""
    if step.cfg.curvature_fraction >= 1:
        return None
    size = task_size(task_i)
    least = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in step.model.modules()) else 1
    k = max(least, round(step.cfg.curvature_fraction * size))
    return k if k < size else None


def _curvature_task(step: _Step, task_i):
    """Task i, or the random rho-fraction of it that H_i v is taken on: the same rows of every tensor, drawn by
    torch.randperm from torch's default generator (a seeded or resumed run draws the same, and so do auto's
    exact and fd from the same random state)."""
    k = _sample_size(step, task_i)
    return task_i if k is None else rows_of(task_i, torch.randperm(task_size(task_i))[:k])


def _sampled_hessian_vector_product(step: _Step, sample, rng_i, v_dir: list[torch.Tensor]) -> list[torch.Tensor]:
    """H v on a sample of task i by double backward, for v = alpha P_S v_dir (scaled by the loss scale): the
    gradient over every trainable parameter (outside S: the mixed terms) of <alpha P_S g_sample(w), v_dir>, v_dir
    a constant. Like fd's passes it replays task i's random state and leaves running statistics alone."""
    model, plan = step.model, step.plan
    s_params = [plan.params[k] for k in plan.s_index]
    with twice_differentiable(), replayed_rng(rng_i, rng_devices(plan.params)), frozen_running_stats(model):
        loss = step.loss(model, sample, "task_i")
        _refuse_once_differentiable(plan, loss)
        g_s = step.grad(loss, s_params, create_graph=True)
        alpha_v = [a * v if isinstance(a, torch.Tensor) else v * a for a, v in zip(step.alphas, v_dir)]
        # g_sample and v_dir both carry the loss scale; H v carries it once, as fd's difference does
        return _grad(_dot(g_s, alpha_v) / step.scale, plan.params, 1.0)


def _hessian_vector_product(step: _Step, task, rng_i, g_at_w, v_dir, v_norms: torch.Tensor, scheme: str,
                            full_precision: bool, eps: float | None = None) -> list[torch.Tensor]:
    """H v for v = alpha P_S v_dir (scaled by the loss scale), as a finite difference of the gradient of the loss
    on `task` (task i or its sample). `v_norms`: the norm of each tensor of v_dir. `g_at_w`: that gradient at w,
    which a forward difference reuses; None where it must be taken again (a sample, or full precision).

    The extra passes replay task i's random state (same dropout masks) and leave running statistics alone.
    Step r such that ||r v|| = eps * ||w_S|| (eps itself where ||w_S|| = 0); eps by scheme and dtype unless
    given. `full_precision`: the passes run outside bf16/fp16 autocast, where a difference of two
    low-precision gradients is mostly rounding noise (0.3 to 1.0 relative error at any step size,
    benchmarks/fd_error.py); a forward difference then takes grad L_i at w again instead of reusing g_i.
    """
    model, plan, alphas, scale = step.model, step.plan, step.alphas, step.scale
    s_idx = plan.s_index
    s_names = [plan.names[k] for k in s_idx]
    w_s = [plan.params[k] for k in s_idx]
    with torch.no_grad():
        eps = eps or _FD_EPS[scheme].get(w_s[0].dtype, _FD_EPS[scheme][torch.float32])
        v_norm = _step_norms(alphas, v_dir, v_norms).norm() / scale                # ||v||, v = alpha P_S v_dir
        reference = step.w_s_norm if step.w_s_norm > 0 else 1.0       # ||w_S||, from the inner step
        r = float(eps * reference / v_norm.clamp_min(1e-30))          # one sync; fused adds below
    # v = 0 (or underflowed): H_i v = 0. v not finite (fp16 overflow): g_j' is not either, and the step is skipped
    if not (r > 0 and math.isfinite(r * step.max_alpha / scale)):
        return [torch.zeros_like(p) for p in plan.params]
    device = w_s[0].device.type
    devices = rng_devices(plan.params)

    def g_i_at(sign: float) -> list[torch.Tensor]:
        """grad of the loss on `task` at w + sign r v."""
        shifted = _inner_step(w_s, v_dir, alphas, scale / r, out=plan.leaves_like(w_s), sign=-sign)
        precision = torch.autocast(device, enabled=False) if full_precision else contextlib.nullcontext()
        with replayed_rng(rng_i, devices), frozen_running_stats(model), precision, \
                plan.at(model, s_names, shifted) as at_shifted:
            loss = step.loss(at_shifted, task, "task_i")
        return step.grad(loss, _replace(plan.params, s_idx, shifted))

    g_plus = g_i_at(+1.0)
    if scheme == "central":
        g_minus = g_i_at(-1.0)
    else:
        g_minus = g_i_at(0.0) if g_at_w is None else g_at_w
    torch._foreach_sub_(g_plus, g_minus)                             # r H_i v (2 r H_i v if central)
    torch._foreach_mul_(g_plus, 1 / (2 * r if scheme == "central" else r))
    return g_plus


@dataclass
class _Terms:
    """fd's terms (and exact's on a sample of task i) before they are combined into (1-gamma) g_i + gamma
    (g_j' - H_i v)."""

    g_i: list[torch.Tensor]     # grad L_i(w), every trainable parameter
    g_j: list[torch.Tensor]     # g_j' = grad L_j(w'), every trainable parameter
    v_dir: list[torch.Tensor]   # P_S g_j'; v = alpha P_S g_j'
    v_norms: torch.Tensor       # the norm of each tensor of v_dir
    h_i_v: list[torch.Tensor]
    loss_i: torch.Tensor
    loss_j: torch.Tensor
    cosine: torch.Tensor
    rng_i: tuple                # task i's random state, to replay its dropout masks
    scheme: str                 # forward | central | exact
    full_precision: bool        # H_i v from float32 passes under bf16/fp16 autocast
    h_task: Any                 # what H_i v is taken on: task i, or a sample of it (curvature_fraction)
    h_g_at_w: list[torch.Tensor] | None   # its gradient at w where fd's forward difference may reuse it (g_i)


def _terms(step: _Step, task_i, task_j, curvature: str) -> _Terms:
    """g_i, w' and g_j' from all of task i and task j, then H_i v by `curvature`: fd (finite differences), or
    exact (double backward, on a sample of task i; the whole of it is `_exact`'s single backward)."""
    model, plan = step.model, step.plan
    rng_i = rng_state(rng_devices(plan.params))                      # to replay task i's dropout masks
    loss_i = step.loss(model, task_i, "task_i")
    g_i = step.grad(loss_i, plan.params)
    s_idx = plan.s_index
    s_names = [plan.names[k] for k in s_idx]
    w_s = [plan.params[k] for k in s_idx]
    g_i_s = [g_i[k] for k in s_idx]
    alphas = step.inner_step_sizes(g_i_s, [g for g, s in zip(g_i, plan.in_s) if not s] if step.needs_rest_of_g_i
                                   else [])
    with torch.no_grad():
        w_prime = _inner_step(w_s, g_i_s, alphas, step.scale, out=plan.leaves_like(w_s))
    with frozen_running_stats(model, step.bn_first), plan.at(model, s_names, w_prime) as at_w:
        loss_j = step.loss(at_w, task_j, "task_j")
    g_j = step.grad(loss_j, _replace(plan.params, s_idx, w_prime))  # g_j' = grad L_j(w'), all params
    g_j_s = [g_j[k] for k in s_idx]
    v_norms = _norms([g.detach() for g in g_j_s])
    cosine = _cosine(g_i_s, g_j_s, a_norm=step.g_s_norm, b_norms=v_norms)
    h_task = _curvature_task(step, task_i)          # drawn after task j's pass, in exact and fd alike
    if curvature == "exact":
        h_i_v = _sampled_hessian_vector_product(step, h_task, rng_i, g_j_s)
        return _Terms(g_i, g_j, g_j_s, v_norms, h_i_v, loss_i, loss_j, cosine, rng_i, "exact", False, h_task, None)
    device = w_s[0].device.type
    low_precision = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in (torch.float16,
                                                                                            torch.bfloat16)
    scheme = "central" if low_precision else step.cfg.fd_scheme
    h_g_at_w = g_i if h_task is task_i and not low_precision else None
    h_i_v = _hessian_vector_product(step, h_task, rng_i, h_g_at_w, g_j_s, v_norms, scheme, low_precision,
                                    step.cfg.fd_eps)
    return _Terms(g_i, g_j, g_j_s, v_norms, h_i_v, loss_i, loss_j, cosine, rng_i, scheme, low_precision, h_task,
                  h_g_at_w)


def _from_terms(step: _Step, t: _Terms) -> list[torch.Tensor]:
    torch._foreach_sub_(t.g_j, t.h_i_v)                              # g_j' - H_i v
    torch._foreach_lerp_(t.g_i, t.g_j, step.cfg.gamma)               # (1-gamma) g_i + gamma (g_j' - H_i v)
    s_idx = step.plan.s_index
    step.second_order_share = step.cfg.gamma * _norms([t.h_i_v[k] for k in s_idx]).norm() / _norms(
        [t.g_i[k] for k in s_idx]).norm().clamp_min(1e-30)
    return t.g_i


def _finite_difference(step: _Step, task_i, task_j):
    t = _terms(step, task_i, task_j, "fd")
    return _from_terms(step, t), t.loss_i, t.loss_j, t.cosine


_METHODS = {"none": _none, "first": _first_order, "exact": _exact, "fd": _finite_difference}


# ---- auto and the kink check (timm_mltp/auto.py measures; the plan keeps what it settled on)

def _auto(step: _Step, task_i, task_j):
    """`auto`: measure on the first step that can tell, then settle for this model, selection, device and dtype."""
    result, check = probe(step, task_i, task_j)
    if check is not None:
        key = _auto_key(step.plan)
        step.plan.auto[key], step.plan.checks[key] = check.choice, check
        report(step.model, step.cfg.variant, step.cfg.second_order, check)
    return result


def _checked_fd(step: _Step, task_i, task_j):
    """second_order='fd', first step that can tell: the kink detector runs once, and warns."""
    result, check = checked_fd(step, task_i, task_j)
    if check is not None:
        step.plan.checks[_auto_key(step.plan)] = check
        report(step.model, step.cfg.variant, step.cfg.second_order, check)
    return result


def _method_for(model: nn.Module, plan: _Plan, cfg: MLTPConfig) -> str:
    if cfg.variant == "none" or not any(plan.in_s):
        return "none"
    if cfg.variant == "fo":
        return "first"
    if cfg.second_order == "auto":
        return plan.auto.get(_auto_key(plan), "auto")
    return cfg.second_order


def _auto_key(plan: _Plan) -> tuple:
    p = plan.params[plan.s_index[0]]
    return p.device, p.dtype


def _gradient(step: _Step, method: str, task_i, task_j):
    """(grads, L_i, L_j, cosine, method actually used): the method's function, or the first-step checks."""
    if method == "auto":
        return _auto(step, task_i, task_j)
    if method == "fd" and _auto_key(step.plan) not in step.plan.checks:
        return _checked_fd(step, task_i, task_j)
    try:
        return (*_METHODS[method](step, task_i, task_j), method)
    except (RuntimeError, NotImplementedError) as e:
        if method == "exact" and is_double_backward_error(e):
            raise MLTPConfigError(f"second_order='exact' needs double backward, which {type(step.model).__name__} "
                                  f"does not support even with math attention and composite hard-swish "
                                  f"({first_line(e)}). Use second_order='auto' (fd, checked for kinks) or "
                                  f"'fd'.") from e
        raise


def mltp_backward(model: nn.Module, task_i, task_j, loss_fn: Callable[[Any, Any], torch.Tensor],
                  cfg: MLTPConfig, alpha: Alpha, loss_scale: float = 1.0) -> MLTPStats:
    """Accumulate grad L_MLTP into `.grad` of every trainable parameter of `model` and return the step's stats.

    loss_fn(module, batch) -> scalar loss. It is called with `model` for task i and, for task j, with the
    same module with its parameters swapped for w' (any use of it sees w'). `alpha` is a float, {parameter
    name: float} (see `alpha_from_optimizer`), or a rule (timm_mltp.inner_step) called with the norms of
    P_S g_i and w_S. `loss_scale` multiplies the accumulated gradients as `scaler.scale(loss).backward()`
    would (fp16); the inner step always uses the unscaled gradient.
    """
    if not isinstance(cfg, MLTPConfig):
        raise MLTPConfigError(f"cfg must be an MLTPConfig, got {type(cfg).__name__}")
    plan = _plan(model, cfg.variant)
    step = _Step(model, plan, loss_fn, cfg, alpha, float(loss_scale))   # one sync if a tensor, not one per tensor
    if not callable(alpha):
        _alphas(alpha, [plan.names[k] for k in plan.s_index],         # bad alpha: an error before any pass
                [plan.params[k] for k in plan.s_index])
    method = _method_for(model, plan, cfg)
    with torch.enable_grad():
        grads, loss_i, loss_j, cosine, method = _gradient(step, method, task_i, task_j)
    for p, g in zip(plan.params, grads):
        if p.grad is None:
            p.grad = g.detach()
        else:
            p.grad.add_(g)
    loss = (1 - cfg.gamma) * loss_i.detach() + cfg.gamma * loss_j.detach()
    share = step.second_order_share if method in ("exact", "fd") else torch.zeros(())
    values = torch.stack([loss.double(), loss_i.detach().double(), loss_j.detach().double(),
                          cosine.double().to(loss.device), share.double().to(loss.device)]).tolist()   # one sync
    return MLTPStats(*values[:4], alpha=step.mean_alpha, inner_step=step.inner_step, relative_step=step.relative_step,
                     second_order=method, second_order_share=values[4])


def second_order_in_use(model: nn.Module, cfg: MLTPConfig) -> str:
    """What `auto` settled on for this model and selection (after its first step), else what cfg asks for."""
    return _method_for(model, _plan(model, cfg.variant), cfg)


def second_order_check(model: nn.Module, cfg: MLTPConfig) -> SecondOrderCheck | None:
    """What the first step of `auto` (or of second_order='fd') measured for this model and selection on the
    device and dtype of its parameters; None before that step, and for variants without a second order."""
    plan = _plan(model, cfg.variant)
    return plan.checks.get(_auto_key(plan)) if any(plan.in_s) else None


__all__ = ["ALPHA_RULES", "FD_SPEEDUP", "FD_TOLERANCE", "KINK_TOLERANCE", "MLTPConfig", "MLTPStats",
           "SecondOrderCheck", "alpha_from_optimizer", "is_double_backward_error", "mltp_backward",
           "second_order_check", "second_order_in_use", "split_tasks"]
