"""How `auto` decides between exact and fd, and how fd is checked for kinks (SPEC.md, Two ways to get the
second order: kinks, auto).

    probe        auto's first step that can tell: exact and fd from the same state and fd's kink detector;
                 keeps exact wherever double backward works, fd where it does not. Only on request
                 (`MLTPConfig.auto_timing`): where fd is accurate (within FD_TOLERANCE of exact, free of kinks),
                 one warm step of each, timed, and fd kept where faster (FD_SPEEDUP)
    checked_fd   second_order='fd', first step that can tell: the kink detector alone
    report       one log line per measurement: info where the second order is trustworthy, else a warning

Both measure one MLTP step as `timm_mltp.mltp` runs it, through the step object it passes in (`step.exact`,
`step.fd_terms`, `step.fd_gradient`, `step.hessian_vector_product`, `step.left`, `step.restore`), with the
curvature fraction in force: exact and fd draw the same sample of task i, because the random state is
restored between them.

Reproducible by default: the choice follows from the model, the selection and the numbers of the first step,
never from a clock, so a seeded run is the same run whatever else the machine is doing. A timed choice
(`auto_timing=True`) can differ between two runs of one seed, on a loaded machine or near FD_SPEEDUP; the
choice is then made on process 0, recorded with the run and kept on resume (step.py).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .double_backward import is_double_backward_error

_logger = logging.getLogger("timm_mltp")

# `auto` keeps fd only where fd's second-order term gamma H_i v lands within this of exact's (relative L2 over
# all trainable parameters, first step). Smooth timm models, float32: 6e-4 to 2e-2; ReLU / max-pool / hard-swish
# networks: 0.3 to 50 at any step size, except on a step that happens to cross no kink (then the detector).
FD_TOLERANCE = 0.05
# ... and, when the user asks for a timed choice (auto_timing), only where one fd step takes less than this times
# one exact step: fd is the approximation, and one timing of each (warm) varies by 20% on a busy machine.
FD_SPEEDUP = 0.8
# fd's forward and central estimates of H_i v (each at its default step) differ by more than this: the steps
# cross kinks. Smooth timm models: 6e-4 to 4e-2; kinked ones: 0.5 and more (README, benchmarks/second_order.py).
KINK_TOLERANCE = 0.2


@dataclass(frozen=True)
class SecondOrderCheck:
    """What the first step of `auto` (or of second_order='fd') measured for one model, selection, device and
    dtype. `second_order_check(model, cfg)` returns it."""

    choice: str            # exact | fd: what runs from then on
    exact: str             # ok | not tried | why double backward fails even with timm_mltp.double_backward
    fd_error: float        # ||gamma (H_i v by fd - H_i v exact)|| / ||gamma H_i v exact||; nan without exact
    disagreement: float    # ||H_i v forward - H_i v central|| / ||H_i v central||: fd across kinks
    exact_seconds: float   # one exact step, warm; nan where not timed (only with auto_timing, where fd is accurate)
    fd_seconds: float      # one fd step, warm; nan where not timed

    @property
    def kinked(self) -> bool:
        return self.disagreement > KINK_TOLERANCE

    @property
    def fd_accurate(self) -> bool:
        """fd matched exact on this step, and not by luck: a step that crossed no kink this time crosses
        some on later steps wherever the detector finds them."""
        return self.fd_error <= FD_TOLERANCE and not self.kinked


def _norm(a: list[torch.Tensor]) -> float:
    return float(torch.stack(torch._foreach_norm(a)).norm())


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return _norm(torch._foreach_sub(a, b))


def _ratio(num: float, den: float) -> float:
    """num / den; nan where both are 0 (nothing to measure: alpha = 0)."""
    return num / den if den > 0 else (math.nan if num == 0 else math.inf)


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _timed(step, fn, *args):
    device = step.device
    backend = getattr(torch, device.type, None)
    sync = backend.synchronize if device.type != "cpu" and hasattr(backend, "synchronize") else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - start


def _fd_disagreement(step, t) -> float:
    """The kink detector: fd's other scheme at its own default step, against the step's estimate of H_i v.
    Where L_i is smooth they differ by the forward difference's truncation error; across kinks (ReLU,
    max-pool, hard-swish) each estimate is dominated by gradient jumps that do not shrink with the step."""
    other = "central" if t.scheme == "forward" else "forward"
    h_other = step.hessian_vector_product(t, other)
    forward, central = (t.h_i_v, h_other) if t.scheme == "forward" else (h_other, t.h_i_v)
    return _ratio(_distance(forward, central), _norm(central))


def _fd_judged(step, task_i, task_j):
    """An fd step with what judges it: the kink detector and the first-order part (1-gamma) g_i + gamma g_j'
    (exact and fd differ from it by their second-order terms)."""
    t = step.fd_terms(task_i, task_j)
    disagreement = _fd_disagreement(step, t) if step.inner_step > 0 else math.nan
    first_order = torch._foreach_lerp(t.g_i, t.g_j, step.cfg.gamma)
    return (step.fd_gradient(t), t.loss_i, t.loss_j, t.cosine), first_order, disagreement


def _exact_or_why(step, task_i, task_j, before):
    """(exact's result, "ok"), or (None, why) where double backward fails even with the replacements. A
    failed attempt leaves no trace: back to `before`, what `step.left()` said before it."""
    try:
        return step.exact(task_i, task_j), "ok"
    except (RuntimeError, NotImplementedError) as e:
        step.restore(before)
        if not is_double_backward_error(e):
            raise
        return None, first_line(e)


def _warm_seconds(step, task_i, task_j, before) -> list[float]:
    """One more step of exact and of fd, timed: the first run of each pays for caches, allocations and kernel
    selection (8x on a small model), which training does not."""
    seconds = []
    for method in (step.exact, step.finite_difference):
        step.restore(before)
        seconds.append(_timed(step, method, task_i, task_j)[1])
    return seconds


def _measurable(step, grads: list[torch.Tensor], ratio: float) -> bool:
    """Whether a ratio measured on this step means something: alpha > 0 (a second-order term to measure), finite
    gradients (fp16 overflows on early steps), a defined ratio."""
    return step.inner_step > 0 and not math.isnan(ratio) and math.isfinite(_norm(grads))


def probe(step, task_i, task_j):
    """`auto`'s measurement: exact and fd from the same state (buffers and random state restored between
    them) and fd's kink detector; exact is kept wherever double backward works. With `auto_timing`, where fd is
    accurate, one warm step of each is timed and fd kept where faster. Returns the step's result by the chosen
    method (grads, L_i, L_j, cosine, method), leaving what a plain run of it leaves, and the check; None where
    this step cannot tell (alpha = 0, non-finite gradients)."""
    before = step.left()
    exact, exact_status = _exact_or_why(step, task_i, task_j, before)
    if exact is not None and not step.inner_step > 0:               # no second-order term to measure
        return (*exact, "exact"), None
    left = {"exact": step.left()}
    step.restore(before)
    fd, first_order, disagreement = _fd_judged(step, task_i, task_j)
    left["fd"] = step.left()
    check = SecondOrderCheck("fd", exact_status, math.nan, disagreement, math.nan, math.nan)
    if exact is not None:   # exact = first_order - gamma H v, fd = first_order - gamma H v by fd
        fd_error = _ratio(_distance(fd[0], exact[0]), _distance(first_order, exact[0]))
        check = dataclasses.replace(check, fd_error=fd_error)
        if check.fd_accurate and step.cfg.auto_timing:            # on request only: then speed decides
            exact_seconds, fd_seconds = _warm_seconds(step, task_i, task_j, before)
            check = dataclasses.replace(check, exact_seconds=exact_seconds, fd_seconds=fd_seconds)
        if not (check.fd_accurate and check.fd_seconds < FD_SPEEDUP * check.exact_seconds):   # nan: False
            check = dataclasses.replace(check, choice="exact")
    step.restore(left[check.choice])
    measured = _measurable(step, fd[0], disagreement) and (exact is None or _measurable(step, exact[0], check.fd_error))
    result = exact if check.choice == "exact" else fd
    return (*result, check.choice), check if measured else None


def checked_fd(step, task_i, task_j):
    """second_order='fd', first step that can tell: an fd step and its kink detector. Returns the step's result
    (grads, L_i, L_j, cosine, "fd") and the check, None where this step cannot tell."""
    result, _, disagreement = _fd_judged(step, task_i, task_j)
    check = SecondOrderCheck("fd", "not tried", math.nan, disagreement, math.nan, math.nan)
    return (*result, "fd"), check if _measurable(step, result[0], disagreement) else None


_ADVICE = ("For a gradient you can trust use variant 'fo' (first order: no second-order term), or a network "
           "with smooth activations (SiLU, GELU) and average pooling")


def report(model: nn.Module, variant: str, second_order: str, check: SecondOrderCheck) -> None:
    """One log line per measurement: info where the second order is trustworthy, a warning where it is not."""
    who = f"MLTP second order for {type(model).__name__} (variant {variant!r})"
    kinks = (f"fd's forward and central estimates of H_i v differ by {check.disagreement:.2g} (smooth networks: "
             f"below {KINK_TOLERANCE:g}): its steps cross the kinks of ReLU, max-pool or hard-swish")
    if check.exact != "ok" and check.kinked:
        if second_order == "fd":
            _logger.warning("%s: second_order='fd' is unreliable here: %s. second_order='auto' runs exact double "
                            "backward (the derivative almost everywhere) where the model allows it. %s.", who,
                            kinks, _ADVICE)
        else:
            _logger.warning("%s is unreliable: double backward fails (%s), and %s. Training continues with fd. %s.",
                            who, check.exact, kinks, _ADVICE)
    elif check.exact != "ok":
        _logger.info("%s: fd (double backward: %s); its forward and central estimates of H_i v agree to %.2g: "
                     "smooth", who, check.exact, check.disagreement)
    else:
        timed = not math.isnan(check.fd_seconds)
        timing = f"; one step: fd {check.fd_seconds:.3g} s, exact {check.exact_seconds:.3g} s" if timed else ""
        rule = ("fd is kept within %g and %g, where faster" % (FD_TOLERANCE, KINK_TOLERANCE) if timed else
                "exact wherever double backward works; auto_timing=True would time fd where accurate")
        _logger.info("%s: %s; fd's second-order term is %.2g from exact's and its schemes disagree by %.2g (%s)%s",
                     who, check.choice, check.fd_error, check.disagreement, rule, timing)


__all__ = ["FD_SPEEDUP", "FD_TOLERANCE", "KINK_TOLERANCE", "SecondOrderCheck", "checked_fd", "first_line", "probe",
           "report"]
