"""Double backward through every operation of a model, during MLTP's passes only.

Exact second order differentiates the inner gradient once more (SPEC.md, Two ways to get the second
order). Some operations compute a correct gradient but have no derivative of it:

    operation                                  inside `twice_differentiable()`
    fused scaled-dot-product attention         the math backend (`sdpa_kernel(SDPBackend.MATH)`)
    (CPU flash, CUDA flash / memory-efficient)
    hardsigmoid                                relu6(x + 3) / 6
    hardswish                                  x * relu6(x + 3) / 6

The replacements compute the same function with the same derivative, except at the two kinks of hardswish
(x = -3 and 3, where native and composite take different one-sided derivatives: a set of measure zero).
Nothing in the model changes. The activations are swapped where they are called (`F.hardswish`, which
`nn.Hardswish` and timm's `get_act_fn("hard_swish")` both call) by a torch function mode, for the thread
that runs the block; the attention backend is PyTorch's process-wide setting, restored on exit. Native
hardswish has a double backward in recent PyTorch; it is replaced anyway, so that what the second order
sees does not depend on the PyTorch version.

Surveyed on the CPU (benchmarks/second_order.py): the 14 timm families of tests/test_selection.py,
mobilenetv3_small_050, test_resnet / test_vit / test_convnext / test_efficientnet and BERT / GPT-2 from
transformers need nothing else. timm's own `HardSwishMe` & co. are autograd functions whose backward is
differentiable, and its `HardSwish`/`HardSigmoid` modules are already composite.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


def _hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0


def _hardswish(x: torch.Tensor) -> torch.Tensor:
    return x * (F.relu6(x + 3.0) / 6.0)


def _in_place(fn):
    """`fn` written into its input, as `hardswish_` does: computed on a copy, so that autograd keeps the input
    it saved for the backward."""
    def in_place(x: torch.Tensor) -> torch.Tensor:
        return x.copy_(fn(x.clone()))
    return in_place


_hardswish_, _hardsigmoid_ = _in_place(_hardswish), _in_place(_hardsigmoid)


def _functional(fn, fn_):
    """With the signature of `F.hardswish(input, inplace=False)`."""
    def call(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return fn_(input) if inplace else fn(input)
    return call


# what each replaced callable turns into: the `F.` functions, and the kernels they call (`torch._C._nn`)
_COMPOSITE = {
    F.hardswish: _functional(_hardswish, _hardswish_),
    F.hardsigmoid: _functional(_hardsigmoid, _hardsigmoid_),
    torch._C._nn.hardswish: _hardswish,
    torch._C._nn.hardsigmoid: _hardsigmoid,
    torch._C._nn.hardswish_: _hardswish_,
    torch._C._nn.hardsigmoid_: _hardsigmoid_,
}


class _CompositeActivations(TorchFunctionMode):
    """Calls of the functions in `_COMPOSITE` run their composite forms; every other call runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _COMPOSITE.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def twice_differentiable():
    """Run the block with operations that have a double backward in place of those that do not."""
    with sdpa_kernel(SDPBackend.MATH), _CompositeActivations():
        yield


__all__ = ["twice_differentiable"]
