"""Multi-process MLTP (SPEC.md, Multi-process training).

Each process computes the MLTP gradient of its own pair of tasks with its local inner step, so the
passes must not be synchronised by DDP's backward hooks (`mltp_backward` uses `torch.autograd.grad`,
which never fires them). The optimizer then sees the mean over processes of those gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def average_gradients(params) -> None:
    """Replace each `.grad` by its mean over all processes (a no-op in a single process).

    Call once per optimizer step, after the last accumulated `mltp_backward`. Every process must
    pass the same parameters in the same order; a missing `.grad` counts as zeros.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_dtype.values():  # one collective per dtype and device, not one per tensor
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Every process continues with process 0's buffers (BatchNorm statistics): what DDP's forward does,
    which MLTP bypasses."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def value_of_process_zero(value: int, device) -> int:
    """Process 0's `value`, on every process (itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def leave_process_group() -> None:
    """Destroy the default process group if this process is in one (a no-op otherwise): every process that joins
    one must leave it before it exits, on success and on failure alike."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
