"""Task i and task j of one MLTP step: the two halves of one loader batch of 2B samples (SPEC.md, Batches)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import MLTPConfigError


def split_tasks(batch):
    """Split one loader batch of 2B samples into task i (first half) and task j (second half).

    Works on tensors and on tuples, lists and dicts of them (BatchEncoding included); other
    values (strings, None) are passed to both tasks unchanged.
    """
    sizes = set()
    _collect_sizes(batch, sizes)
    if len(sizes) != 1:
        raise MLTPConfigError(f"cannot split the batch into two tasks: its tensors have "
                              f"{'no batch dimension' if not sizes else f'different batch sizes {sorted(sizes)}'}")
    size = sizes.pop()
    if size < 2 or size % 2:
        raise MLTPConfigError(f"cannot split a batch of {size} samples into two equal tasks: MLTP needs an even "
                              f"batch of 2B samples (B per task); set the loader's batch size to twice the task size "
                              f"and drop_last=True")
    half = size // 2
    return _take(batch, slice(0, half)), _take(batch, slice(half, size))


def task_size(task) -> int:
    """The number of samples in one task (its tensors' batch dimension)."""
    sizes = set()
    _collect_sizes(task, sizes)
    if len(sizes) != 1:
        raise MLTPConfigError(f"a task's tensors must share one batch dimension, got "
                              f"{'none' if not sizes else f'sizes {sorted(sizes)}'}")
    return sizes.pop()


def rows_of(task, rows: torch.Tensor):
    """The same rows (a tensor of indices) of every tensor in a task, in the task's own structure."""
    return _take(task, rows)


def _collect_sizes(x, sizes: set) -> None:
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        sizes.add(x.shape[0])
    elif isinstance(x, Mapping):
        for v in x.values():
            _collect_sizes(v, sizes)
    elif isinstance(x, (tuple, list)):
        for v in x:
            _collect_sizes(v, sizes)


def _take(x, sl: slice | torch.Tensor):
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x[sl.to(x.device) if isinstance(sl, torch.Tensor) else sl]
    if isinstance(x, Mapping):
        return _same_mapping_type(x, {k: _take(v, sl) for k, v in x.items()})
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_take(v, sl) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_take(v, sl) for v in x)
    return x


def _same_mapping_type(original: Mapping, items: dict) -> Mapping:
    """A dict subclass such as transformers' BatchEncoding stays one where its constructor takes a dict."""
    if type(original) is dict:
        return items
    try:
        return type(original)(items)
    except TypeError:
        return items


def even_batch(batch):
    """The batch with its last sample left out when it holds an odd number (the last batch of an
    IterableDataset); None when it holds a single sample. Other batches are returned as they are."""
    sizes = set()
    _collect_sizes(batch, sizes)
    if len(sizes) != 1 or next(iter(sizes)) % 2 == 0:
        return batch
    size = next(iter(sizes))
    return _take(batch, slice(0, size - 1)) if size > 1 else None
