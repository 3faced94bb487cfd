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
"""
from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import MLTPConfigError
from .selection import select_parameters

_logger = logging.getLogger("timm_mltp")

SECOND_ORDER = ("auto", "exact", "fd")
BN_UPDATE = ("both", "first")
FD_SCHEMES = ("forward", "central")

# Finite-difference step, relative to the weight norm of S: ||r v|| = fd_eps * ||w_S||. Measured
# against exact double backward on smooth timm models (benchmarks/fd_error.py): in float32 the
# forward difference is best near 1e-5 (rel. error ~3e-3), the central one near 1e-4 (~4e-4).
_FD_EPS = {"forward": {torch.float64: 1e-7, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2},
           "central": {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}}


@dataclass
class MLTPConfig:
    """What MLTP does each step; see SPEC.md for every field."""

    variant: str = "full"        # none | full | conv | fc | fo | head | glob patterns "layer4.*,fc.*"
    gamma: float = 0.5           # weight of task j, in (0, 1]
    second_order: str = "auto"   # auto | exact | fd
    bn_update: str = "both"      # both passes update BatchNorm running statistics, or only the first
    fd_scheme: str = "forward"   # fd: one-sided difference reusing g_i (1 extra pass) or central (2)
    fd_eps: float | None = None  # fd: step size relative to ||w_S||; None picks by dtype

    def __post_init__(self):
        if not isinstance(self.variant, str) or not self.variant.strip():
            raise MLTPConfigError(f"variant must be a non-empty string such as 'full' or 'layer4.*,fc.*', "
                                  f"got {self.variant!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0 < self.gamma <= 1:
            raise MLTPConfigError(f"gamma must be a number in (0, 1] (the weight of task j), got {self.gamma!r}; "
                                  f"0.5 weighs both tasks equally")
        for field, value, allowed in (("second_order", self.second_order, SECOND_ORDER),
                                      ("bn_update", self.bn_update, BN_UPDATE),
                                      ("fd_scheme", self.fd_scheme, FD_SCHEMES)):
            if value not in allowed:
                raise MLTPConfigError(f"{field} must be one of {', '.join(allowed)}, got {value!r}")
        if self.fd_eps is not None and not (isinstance(self.fd_eps, (int, float)) and self.fd_eps > 0):
            raise MLTPConfigError(f"fd_eps must be a positive number or None (chosen by dtype), got {self.fd_eps!r}")


@dataclass
class MLTPStats:
    """What one call of `mltp_backward` measured (unscaled by any loss scale)."""

    loss: float          # L_MLTP = (1-gamma) L_i(w) + gamma L_j(w')
    loss_i: float        # L_i(w)
    loss_j: float        # L_j(w'); at w for variant none
    grad_cosine: float   # cos(P_S g_i(w), P_S g_j(w')); over all trainable parameters for variant none
    alpha: float         # inner step size, mean over S weighted by parameter count
    second_order: str    # none | first | exact | fd: how the gradient was obtained

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self):
        return asdict(self).keys()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _at(model: nn.Module, params: dict[str, torch.Tensor]):
    """The model itself, evaluated with some parameters replaced (w' for task j, w + r v for fd).

    The same swap `torch.func.functional_call` makes, held for the whole `loss_fn` call, so that
    `loss_fn` may use the module any way it likes (`module(x)`, `module.forward_features(x)`,
    `module.fc`) and always sees the replaced parameters.
    """
    with torch.nn.utils.stateless._reparametrize_module(model, params, tie_weights=True, strict=False):
        yield model


@dataclass
class _Plan:
    """The per-model facts that do not change between steps."""

    names: list[str]   # trainable parameters
    params: list[nn.Parameter]
    in_s: list[bool]   # which of them are in S
    scratch: list[torch.Tensor] | None = None  # fo/fd: storage for w' and w + r v, reused every step

    def leaves_like(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Leaf tensors shaped like `params` for w' (fo, fd) or w +- r v (fd). Kept between steps: a fresh
        parameter-sized allocation costs more than the arithmetic written into it (page faults)."""
        if self.scratch is None or [t.shape for t in self.scratch] != [p.shape for p in params]:
            self.scratch = [torch.empty_like(p, requires_grad=True) for p in params]
        return self.scratch


# per model: the plan for each (variant, trainable names), and the second order `auto` settled on
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_auto_choice: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: nn.Module, variant: str) -> _Plan:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    key = (variant, tuple(n for n, _ in named))
    cache = _plans.setdefault(model, {})
    if key not in cache:
        selected = set(select_parameters(model, variant))
        cache[key] = _Plan([n for n, _ in named], [p for _, p in named], [n in selected for n, _ in named])
    return cache[key]


def alpha_from_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, alpha_scale: float = 1.0) -> dict[str, float]:
    """SPEC's default inner step size: each parameter's current learning rate times `alpha_scale`.

    Read it every step: it then follows warmup and decay. Adaptive optimizers (AdamW) take steps
    far larger than lr * gradient, so they want a larger `alpha_scale` (10 to 100).
    """
    if not (isinstance(alpha_scale, (int, float)) and alpha_scale >= 0):
        raise MLTPConfigError(f"alpha_scale must be a number >= 0, got {alpha_scale!r}")
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {n: float(lr_of[id(p)]) * alpha_scale for n, p in model.named_parameters() if id(p) in lr_of}


def _alphas(alpha: float | Mapping[str, float], plan: _Plan) -> list[float]:
    """One inner step size per tensor of S."""
    s_names = [n for n, s in zip(plan.names, plan.in_s) if s]
    if isinstance(alpha, Mapping):
        missing = [n for n in s_names if n not in alpha]
        if missing:
            raise MLTPConfigError(f"alpha has no step size for {len(missing)} parameters of S, e.g. {missing[:3]}; "
                                  f"give a float, or a mapping from every parameter name in S to a float "
                                  f"(alpha_from_optimizer builds it from the optimizer's learning rates)")
        values = [alpha[n] for n in s_names]
    else:
        values = [alpha] * len(s_names)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or math.isinf(v):
            raise MLTPConfigError(f"alpha (the inner step size) must be a finite number >= 0, got {v!r}")
    return [float(v) for v in values]


@contextlib.contextmanager
def _frozen_running_stats(model: nn.Module, frozen: bool = True):
    """Normalise with batch statistics as usual, but leave running statistics untouched."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats] if frozen else []
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _rng_devices(params: list[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def _rng_state(devices: list[int]):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state, devices: list[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)


@contextlib.contextmanager
def _replayed_rng(state, devices: list[int]):
    """Run with the random state of an earlier pass (same dropout masks), then continue as before."""
    with torch.random.fork_rng(devices=devices):
        _set_rng_state(state, devices)
        yield


def _call_loss(loss_fn, module, batch, which: str) -> torch.Tensor:
    loss = loss_fn(module, batch)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise MLTPConfigError(f"loss_fn(module, {which}) must return a scalar tensor that depends on the model's "
                              f"parameters, got {got}" + (" without grad (called under torch.no_grad?)"
                                                          if isinstance(loss, torch.Tensor) and loss.dim() == 0 else ""))
    return loss


def _grad(loss, inputs, scale, create_graph=False):
    if not (isinstance(scale, float) and scale == 1.0):
        loss = loss * scale
    # backward outside autocast, as `loss.backward()` after an autocast forward: inside it the backward's
    # matrix products would run in bf16/fp16 too (autocast state is thread-local, and so is the backward)
    device = loss.device.type
    outside = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
    with outside:
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()


def _norms(a: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(a))


def _cosine(a, b) -> torch.Tensor:
    a, b = [x.detach() for x in a], [x.detach() for x in b]
    return _dot(a, b) / (_norms(a).norm() * _norms(b).norm()).clamp_min(1e-30)


def _inner_step(params, grads, alphas, scale, out=None):
    """w' = w - alpha * grad, one fused kernel per tensor, into `out` where given; the gradient is unscaled."""
    if out is None:
        return [torch.add(p, g, alpha=-a / scale) for p, g, a in zip(params, grads, alphas)]
    with torch.no_grad():
        for p, g, a, o in zip(params, grads, alphas, out):
            torch.add(p, g, alpha=-a / scale, out=o)
    return out


def _replace(params: list, positions: list[int], values: list) -> list:
    out = list(params)
    for k, v in zip(positions, values):
        out[k] = v
    return out


# ---- the four gradients. Each returns (grads of all trainable params, L_i, L_j, cosine); grads are
# ---- multiplied by `scale` (a loss scale), the inner step always uses unscaled gradients.

def _none(model, plan, task_i, task_j, loss_fn, cfg, alphas, scale, bn_first):
    loss_i = _call_loss(loss_fn, model, task_i, "task_i")
    g_i = _grad(loss_i, plan.params, scale)
    with _frozen_running_stats(model, bn_first):
        loss_j = _call_loss(loss_fn, model, task_j, "task_j")
    g_j = _grad(loss_j, plan.params, scale)
    cosine = _cosine(g_i, g_j)
    torch._foreach_lerp_(g_i, g_j, cfg.gamma)                        # (1-gamma) g_i + gamma g_j
    return g_i, loss_i, loss_j, cosine


def _first_order(model, plan, task_i, task_j, loss_fn, cfg, alphas, scale, bn_first):
    loss_i = _call_loss(loss_fn, model, task_i, "task_i")
    g_i = _grad(loss_i, plan.params, scale)
    with torch.no_grad():                                            # w' = w - alpha g_i, a constant
        w_prime = _inner_step(plan.params, g_i, alphas, scale, out=plan.leaves_like(plan.params))
    with _frozen_running_stats(model, bn_first), _at(model, dict(zip(plan.names, w_prime))) as at_w_prime:
        loss_j = _call_loss(loss_fn, at_w_prime, task_j, "task_j")
    g_j = _grad(loss_j, w_prime, scale)                              # g_j' = grad L_j(w')
    cosine = _cosine(g_i, g_j)
    torch._foreach_lerp_(g_i, g_j, cfg.gamma)                        # (1-gamma) g_i + gamma g_j'
    return g_i, loss_i, loss_j, cosine


def _exact(model, plan, task_i, task_j, loss_fn, cfg, alphas, scale, bn_first):
    s_params = [p for p, s in zip(plan.params, plan.in_s) if s]
    s_names = [n for n, s in zip(plan.names, plan.in_s) if s]
    loss_i = _call_loss(loss_fn, model, task_i, "task_i")
    # P_S g_i with its graph: w' depends on w through it, which gives the second-order terms
    g_s = _grad(loss_i, s_params, scale, create_graph=True)
    w_prime = _inner_step(s_params, g_s, alphas, scale)             # w' = w - alpha P_S g_i
    with _frozen_running_stats(model, bn_first), _at(model, dict(zip(s_names, w_prime))) as at_w_prime:
        loss_j = _call_loss(loss_fn, at_w_prime, task_j, "task_j")
    # one backward through both tasks and the inner gradient; asking for w' too yields gamma P_S g_j'
    grads = _grad(torch.lerp(loss_i, loss_j, cfg.gamma), plan.params + w_prime, scale)
    n = len(plan.params)
    return grads[:n], loss_i, loss_j, _cosine(g_s, grads[n:])


def _finite_difference(model, plan, task_i, task_j, loss_fn, cfg, alphas, scale, bn_first):
    devices = _rng_devices(plan.params)
    rng_i = _rng_state(devices)                                      # to replay task i's dropout masks
    loss_i = _call_loss(loss_fn, model, task_i, "task_i")
    g_i = _grad(loss_i, plan.params, scale)
    s_idx = [k for k, s in enumerate(plan.in_s) if s]
    s_names = [plan.names[k] for k in s_idx]
    w_s = [plan.params[k] for k in s_idx]
    with torch.no_grad():
        w_prime = _inner_step(w_s, [g_i[k] for k in s_idx], alphas, scale, out=plan.leaves_like(w_s))
    with _frozen_running_stats(model, bn_first), _at(model, dict(zip(s_names, w_prime))) as at_w_prime:
        loss_j = _call_loss(loss_fn, at_w_prime, task_j, "task_j")
    g_j = _grad(loss_j, _replace(plan.params, s_idx, w_prime), scale)  # g_j' = grad L_j(w'), all params
    g_j_s = [g_j[k] for k in s_idx]

    # Under bf16/fp16 autocast a difference of two low-precision gradients is mostly rounding noise
    # (measured: 0.3 to 1.0 relative error at any step size, benchmarks/fd_error.py); there the
    # Hessian-vector product is taken as a central difference of two float32 passes instead.
    device = w_s[0].device.type
    low_precision = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in (torch.float16,
                                                                                            torch.bfloat16)
    scheme = "central" if low_precision else cfg.fd_scheme
    with torch.no_grad():
        # v = alpha P_S g_j' (unscaled), never formed; r so that ||r v|| = fd_eps ||w_S||
        eps = cfg.fd_eps or _FD_EPS[scheme].get(w_s[0].dtype, _FD_EPS[scheme][torch.float32])
        g_j_norms = _norms(g_j_s)
        v_norm = (g_j_norms * torch.tensor([a / scale for a in alphas], device=g_j_norms.device)).norm()
        r = float(eps * _norms(w_s).norm() / v_norm.clamp_min(1e-30))  # one sync; fused adds below

    def g_i_at(sign: float) -> list[torch.Tensor]:
        """grad L_i at w + sign r v: task i's pass replayed, running statistics untouched."""
        shifted = _inner_step(w_s, g_j_s, [-sign * r * a for a in alphas], scale, out=plan.leaves_like(w_s))
        full_precision = torch.autocast(device, enabled=False) if low_precision else contextlib.nullcontext()
        with _replayed_rng(rng_i, devices), _frozen_running_stats(model), full_precision, \
                _at(model, dict(zip(s_names, shifted))) as at_shifted:
            loss = _call_loss(loss_fn, at_shifted, task_i, "task_i")
        return _grad(loss, _replace(plan.params, s_idx, shifted), scale)

    g_i_s = [g_i[k].detach() for k in s_idx]
    cosine = _dot(g_i_s, g_j_s) / (_norms(g_i_s).norm() * g_j_norms.norm()).clamp_min(1e-30)
    g_plus = g_i_at(+1.0)
    g_minus = g_i_at(-1.0) if scheme == "central" else g_i
    torch._foreach_sub_(g_plus, g_minus)                             # r H_i v (2 r H_i v if central)
    torch._foreach_add_(g_j, g_plus, alpha=-1 / (2 * r if scheme == "central" else r))  # g_j' - H_i v
    torch._foreach_lerp_(g_i, g_j, cfg.gamma)                        # (1-gamma) g_i + gamma (g_j' - H_i v)
    return g_i, loss_i, loss_j, cosine


def _second_order_for(model, plan, cfg) -> str:
    if cfg.variant == "none" or not any(plan.in_s):
        return "none"
    if cfg.variant == "fo":
        return "first"
    if cfg.second_order == "auto":
        return _auto_choice.get(model, "auto")
    return cfg.second_order


_METHODS = {"none": _none, "first": _first_order, "exact": _exact, "fd": _finite_difference}


def mltp_backward(model: nn.Module, task_i, task_j, loss_fn: Callable[[Any, Any], torch.Tensor],
                  cfg: MLTPConfig, alpha: float | Mapping[str, float], loss_scale: float | torch.Tensor = 1.0) -> MLTPStats:
    """Accumulate grad L_MLTP into `.grad` of every trainable parameter of `model` and return the step's stats.

    loss_fn(module, batch) -> scalar loss. It is called with `model` for task i and, for task j, with the
    same module with its parameters swapped for w' (any use of it sees w'). `alpha` is a float or
    {parameter name: float} (see `alpha_from_optimizer`). `loss_scale` multiplies the accumulated gradients as
    `scaler.scale(loss).backward()` would (fp16); the inner step always uses the unscaled gradient.
    """
    if not isinstance(cfg, MLTPConfig):
        raise MLTPConfigError(f"cfg must be an MLTPConfig, got {type(cfg).__name__}")
    plan = _plan(model, cfg.variant)
    alphas = _alphas(alpha, plan)
    bn_first = cfg.bn_update == "first"
    method = _second_order_for(model, plan, cfg)
    with torch.enable_grad():
        if method == "auto":
            grads, loss_i, loss_j, cosine, method = _probe_exact(model, plan, task_i, task_j, loss_fn, cfg,
                                                                 alphas, loss_scale, bn_first)
        else:
            try:
                grads, loss_i, loss_j, cosine = _METHODS[method](model, plan, task_i, task_j, loss_fn, cfg,
                                                                 alphas, loss_scale, bn_first)
            except (RuntimeError, NotImplementedError) as e:
                if method == "exact" and _is_double_backward_error(e):
                    raise MLTPConfigError(f"second_order='exact' needs double backward, which {type(model).__name__} "
                                          f"does not support ({_first_line(e)}). Use second_order='fd' or 'auto'.") from e
                raise
    for p, g in zip(plan.params, grads):
        if p.grad is None:
            p.grad = g.detach()
        else:
            p.grad.add_(g)
    loss = (1 - cfg.gamma) * loss_i.detach() + cfg.gamma * loss_j.detach()
    s_numel = [p.numel() for p, s in zip(plan.params, plan.in_s) if s]
    mean_alpha = sum(a * n for a, n in zip(alphas, s_numel)) / sum(s_numel) if s_numel else 0.0
    values = torch.stack([loss.double(), loss_i.detach().double(), loss_j.detach().double(),
                          cosine.double().to(loss.device)]).tolist()  # one device sync per step
    return MLTPStats(*values, alpha=mean_alpha, second_order=method)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _is_double_backward_error(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, NotImplementedError) or any(k in text for k in (
        "derivative for", "not implemented", "double backward", "does not support", "not supported",
        "does not require grad", "backward through the graph a second time", "_backward"))


def _probe_exact(model, plan, task_i, task_j, loss_fn, cfg, alphas, scale, bn_first):
    """`auto`, first call for this model: try double backward; where it fails, settle on fd for good."""
    devices = _rng_devices(plan.params)
    rng, buffers = _rng_state(devices), {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        result = _exact(model, plan, task_i, task_j, loss_fn, cfg, alphas, scale, bn_first)
        _auto_choice[model] = "exact"
        _logger.info("MLTP second order for %s: exact (double backward)", type(model).__name__)
        return (*result, "exact")
    except (RuntimeError, NotImplementedError) as e:
        if not _is_double_backward_error(e):
            raise
        _logger.warning("MLTP second order for %s: fd (finite differences), since double backward fails: %s",
                        type(model).__name__, _first_line(e))
    # undo the failed attempt's side effects (running statistics, random state) so the step is a plain fd
    # step; nothing reached .grad, since gradients go through autograd.grad and are accumulated at the end
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    _set_rng_state(rng, devices)
    _auto_choice[model] = "fd"
    return (*_finite_difference(model, plan, task_i, task_j, loss_fn, cfg, alphas, scale, bn_first), "fd")


def second_order_in_use(model: nn.Module, cfg: MLTPConfig) -> str:
    """What `auto` settled on for this model (after its first step), else what cfg asks for."""
    return _second_order_for(model, _plan(model, cfg.variant), cfg)


def split_tasks(batch):
    """Split one loader batch of 2B samples into task i (first half) and task j (second half).

    Works on tensors and on tuples, lists and dicts of them (BatchEncoding included); other
    values (strings, None) are passed to both tasks unchanged.
    """
    sizes = set()

    def collect(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            sizes.add(x.shape[0])
        elif isinstance(x, Mapping):
            for v in x.values():
                collect(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                collect(v)

    collect(batch)
    if len(sizes) != 1:
        raise MLTPConfigError(f"cannot split the batch into two tasks: its tensors have "
                              f"{'no batch dimension' if not sizes else f'different batch sizes {sorted(sizes)}'}")
    size = sizes.pop()
    if size < 2 or size % 2:
        raise MLTPConfigError(f"cannot split a batch of {size} samples into two equal tasks: MLTP needs an even "
                              f"batch of 2B samples (B per task); set the loader's batch size to twice the task size "
                              f"and drop_last=True")
    half = size // 2

    def take(x, sl):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x[sl]
        if isinstance(x, Mapping):
            return _same_mapping_type(x, {k: take(v, sl) for k, v in x.items()})
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*(take(v, sl) for v in x))
        if isinstance(x, (tuple, list)):
            return type(x)(take(v, sl) for v in x)
        return x

    return take(batch, slice(0, half)), take(batch, slice(half, size))


def _same_mapping_type(original: Mapping, items: dict) -> Mapping:
    """A dict subclass such as transformers' BatchEncoding stays one where its constructor takes a dict."""
    if type(original) is dict:
        return items
    try:
        return type(original)(items)
    except TypeError:
        return items
