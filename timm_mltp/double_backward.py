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
import re

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
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


# what autograd says when an operation has no double backward, and nothing else
_NO_DOUBLE_BACKWARD = re.compile(
    r"derivative for .+ is not implemented"
    r"|double backward"
    r"|differentiate twice"                      # autograd.Function marked @once_differentiable
    r"|requires create_graph=False"              # torch.compile'd backward (donated buffers)
    r"|does not support (higher order|second order|double) (gradients|derivatives|backward)",
    re.IGNORECASE)


def is_double_backward_error(e: BaseException) -> bool:
    """Whether an error from a double-backward pass means "this operation has no double backward"."""
    return isinstance(e, (RuntimeError, NotImplementedError)) and bool(_NO_DOUBLE_BACKWARD.search(str(e)))


# the code of the wrapper `torch.autograd.function.once_differentiable` puts around every backward it marks
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def once_differentiable_in(loss: torch.Tensor) -> list[str]:
    """The autograd Functions marked @once_differentiable on the graph of `loss`, by name. Double backward
    through them does not raise (torch 2.14; autograd's error node for them fires only in some graphs): their
    part of the second derivative is silently zero."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        function = getattr(type(node), "_forward_cls", None)
        if getattr(getattr(function, "backward", None), "__code__", None) is _ONCE_DIFFERENTIABLE:
            names.add(function.__name__)
        stack.extend(n for n, _ in node.next_functions)
    return sorted(names)


__all__ = ["is_double_backward_error", "once_differentiable_in", "twice_differentiable"]
