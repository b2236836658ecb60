"""Routing the rows of a batch to modality-specific modules (streams, BatchNorms, heads).

``route(modules, inputs, modality)`` applies ``modules[m]`` to the rows whose modality is ``m``
and returns the outputs in input order. Two paths give the same result:

* **sorted layout** -- the training sampler builds every batch as all visible rows, then all
  infrared rows (:class:`vireid.data.sampler.CrossModalityBatchSampler`). The trainer knows the
  row counts on the host and declares them with :func:`sorted_modality_layout`; inside that
  block, ``route`` slices the batch (``inputs[:n0]``, ``inputs[n0:]``) and concatenates the
  results. No host-device synchronisation, no data-dependent shapes (``torch.compile`` captures
  it), and memory formats such as channels-last survive. A device-side assertion checks that the
  modality tensor really has that layout, without waiting for it.
* **any layout** -- otherwise (extraction, tests, a model that reorders rows) the rows of each
  modality are gathered by index; this needs the modality values on the host.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

#: Row counts per modality index of the batch being trained on, or None (see module docstring).
_SORTED_COUNTS: tuple[int, ...] | None = None


@contextmanager
def sorted_modality_layout(counts: Sequence[int] | None) -> Iterator[None]:
    """Inside this block, a batch of ``sum(counts)`` rows holds ``counts[0]`` rows of modality 0,
    then ``counts[1]`` rows of modality 1, ... (``None``: no layout is promised)."""
    global _SORTED_COUNTS
    previous = _SORTED_COUNTS
    _SORTED_COUNTS = None if counts is None else tuple(int(c) for c in counts)
    try:
        yield
    finally:
        _SORTED_COUNTS = previous


def sorted_counts(modality: Tensor) -> tuple[int, ...] | None:
    """Row counts per modality if ``modality`` (a CPU tensor) is sorted ascending, else None."""
    if modality.device.type != "cpu" or modality.numel() == 0:
        return None
    values = modality.to(torch.int64)
    if bool((values[1:] < values[:-1]).any()) or int(values[0]) < 0:
        return None
    return tuple(torch.bincount(values).tolist())


def route(modules: Sequence[nn.Module], inputs: Tensor, modality: Tensor) -> Any:
    """``modules[m]`` applied to the rows of modality ``m``; outputs (a tensor or a tuple of
    tensors) in input order."""
    counts = _SORTED_COUNTS
    if counts is not None and sum(counts) == inputs.shape[0] == modality.shape[0]:
        return _route_sorted(modules, inputs, modality, counts)
    return _route_gathered(modules, inputs, modality)


def _route_sorted(modules: Sequence[nn.Module], inputs: Tensor, modality: Tensor, counts: tuple[int, ...]) -> Any:
    follows, start = torch.ones((), dtype=torch.bool, device=modality.device), 0
    for m, n in enumerate(counts):
        follows = follows & (modality[start:start + n] == m).all()
        start += n
    torch._assert_async(follows, "modality rows do not follow the declared sorted layout")
    outputs, start = [], 0
    for m, n in enumerate(counts):
        if n:
            outputs.append(modules[m](inputs[start:start + n]))
            start += n
    if len(outputs) == 1:
        return outputs[0]
    if isinstance(outputs[0], Tensor):
        return torch.cat(outputs)
    return tuple(torch.cat(parts) for parts in zip(*outputs))


def _route_gathered(modules: Sequence[nn.Module], inputs: Tensor, modality: Tensor) -> Any:
    if modality.shape[0] != inputs.shape[0]:
        raise ValueError("modality must have one entry per row")
    present = torch.unique(modality).tolist()
    if len(present) == 1:
        return modules[int(present[0])](inputs)
    merged: list[Tensor] | None = None
    single = False
    for m in present:
        idx = torch.nonzero(modality == m, as_tuple=False).squeeze(1)
        out = modules[int(m)](inputs.index_select(0, idx))
        single = isinstance(out, Tensor)
        parts = (out,) if single else tuple(out)
        if merged is None:
            merged = [_empty_rows(p, inputs.shape[0]) for p in parts]
        merged = [full.index_copy(0, idx, part) for full, part in zip(merged, parts)]
    assert merged is not None
    return merged[0] if single else tuple(merged)


def _empty_rows(like: Tensor, rows: int) -> Tensor:
    """An uninitialised (rows, *like.shape[1:]) tensor in ``like``'s memory format."""
    channels_last = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((rows, *like.shape[1:]), dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)
