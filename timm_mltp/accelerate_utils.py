"""Accelerate and MLTP's mixed precision.

With mixed precision, `accelerator.prepare` wraps `model.forward` in autocast. MLTP wants autocast around
the whole step instead: `mltp_backward` then sees it, and its finite-difference passes can switch it off
(a difference of two bf16/fp16 gradients is mostly rounding noise, SPEC.md, Precision). `mltp_autocast`
swaps the original forward in for the step and opens Accelerate's autocast around it.
"""
from __future__ import annotations

import contextlib

import torch.nn as nn


@contextlib.contextmanager
def mltp_autocast(accelerator, model: nn.Module):
    patched = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")  # set by Accelerate when it patched forward
    if patched is not None and original is not None:
        model.forward = original
    try:
        with accelerator.autocast():
            yield
    finally:
        if patched is not None and original is not None:
            model.forward = patched
