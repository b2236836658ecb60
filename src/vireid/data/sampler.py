"""Identity-balanced cross-modality batch sampler (AGW / CAJ style), deterministic and resumable.

Each batch holds ``num_ids`` identities; for each, ``per_modality`` visible and
``per_modality`` infrared images (paper setting: 8 × (4 + 4) = 64 images). Within a batch, an
identity's images of one modality are drawn without replacement when it has enough of them,
with replacement otherwise. Identities lacking either modality are not sampled.

Batch layout: all visible images first (identity by identity, ``per_modality`` each), then the
infrared images of the same identities in the same order. The model can therefore route the
two modalities to their streams by slicing (:mod:`vireid.models.routing`).

Epoch length (``epoch_length``), in batches of one process:

* ``"images"`` (default, AGW's definition) — as many batches as it takes to draw, per
  modality, as many images as the larger modality has in the training set:
  ``ceil(max(#visible, #infrared) / (num_ids * per_modality))`` batches. Identities are
  visited in a shuffled order, reshuffled whenever all have been used, so within an epoch no
  identity is drawn twice before every identity has been drawn once.
* ``"identities"`` — every identity exactly once per epoch: ``ceil(#ids / num_ids)`` batches
  (the last batch is topped up with identities drawn from the start of a fresh shuffle).

Distributed training (``world_size`` > 1): every process trains on its *own* full batch of
``num_ids`` × (``per_modality`` + ``per_modality``) images -- the paper's batch composition --
and the epoch is divided between the processes: batch ``b`` of the epoch's sequence goes to
rank ``b % world_size``, each rank gets ``ceil(L / world_size)`` batches (``L`` the length
above; the sequence is extended to ``world_size`` × that), and a step of ``world_size``
processes consumes ``world_size`` consecutive batches of the same sequence a single process
would train on one after the other.

The batch sequence of epoch ``e`` is a pure function of ``(seed, e)``; ``set_state(epoch,
position)`` resumes inside an epoch by skipping the first ``position`` batches of this rank.
The state is set by the caller (the trainer knows how many batches it consumed; a loader's
prefetching means the sampler does not), and iterating does not change it. Every
yielded index is a pair ``(record_index, sample_seed)`` so that data augmentation draws from
its own seeded generator (see :class:`vireid.data.image_dataset.ImageDataset`), which keeps
runs exactly reproducible whatever the number of loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from vireid.data.records import ImageRecord, Modality
from vireid.errors import InputError

EpochLength = Literal["images", "identities"]
SampleKey = tuple[int, int]


class CrossModalityBatchSampler:
    """Batches of ``num_ids`` identities × (``per_modality`` visible + ``per_modality`` infrared)."""

    def __init__(self, records: Sequence[ImageRecord], num_ids: int = 8, per_modality: int = 4, *,
                 seed: int = 0, epoch_length: EpochLength = "images", rank: int = 0, world_size: int = 1) -> None:
        if num_ids < 1 or per_modality < 1:
            raise InputError(f"sampler: num_ids and per_modality must be >= 1, got {num_ids}, {per_modality}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        if epoch_length not in ("images", "identities"):
            raise InputError(f"sampler.epoch_length must be 'images' or 'identities', got {epoch_length!r}")
        self.num_ids = num_ids
        self.per_modality = per_modality
        self.seed = seed
        self.epoch_length = epoch_length
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._by_pid = _index_by_identity(records)
        if len(self._by_pid) < num_ids:
            raise InputError(f"sampler: {len(self._by_pid)} identities have both visible and infrared images; "
                             f"a batch needs num_ids={num_ids}")
        self._pids = sorted(self._by_pid)
        n_visible = sum(len(v) for v, _ in self._by_pid.values())
        n_infrared = sum(len(i) for _, i in self._by_pid.values())
        if epoch_length == "images":
            single = math.ceil(max(n_visible, n_infrared) / (num_ids * per_modality))
        else:
            single = math.ceil(len(self._pids) / num_ids)
        self._num_batches = math.ceil(single / world_size)

    @property
    def batch_size(self) -> int:
        """Images per batch (on every rank)."""
        return 2 * self.per_modality * self.num_ids

    def __len__(self) -> int:
        """Batches per epoch of this rank (the same on every rank)."""
        return self._num_batches

    @property
    def global_batches_per_epoch(self) -> int:
        """Batches per epoch of all ranks together."""
        return self._num_batches * self.world_size

    def set_state(self, epoch: int, position: int = 0) -> None:
        """Start the next iteration at batch ``position`` of epoch ``epoch``."""
        if not 0 <= position <= self._num_batches:
            raise ValueError(f"position {position} outside 0..{self._num_batches}")
        self.epoch, self.position = int(epoch), int(position)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise InputError(f"sampler state was saved with seed {state['seed']}, this run uses seed {self.seed}")
        self.set_state(int(state["epoch"]), int(state["position"]))

    def epoch_batches(self, epoch: int) -> list[list[SampleKey]]:
        """The epoch's whole batch sequence (all ranks), each a list of (record index, sample seed)."""
        rng = np.random.default_rng([self.seed, epoch])
        order: list[int] = []
        batches = []
        for _ in range(self.global_batches_per_epoch):
            if len(order) < self.num_ids:
                # top up from a fresh shuffle without repeating an identity inside the batch
                fresh = rng.permutation(len(self._pids)).tolist()
                head = [p for p in fresh if p not in order][:self.num_ids - len(order)]
                order = order + head + [p for p in fresh if p not in head]
            chosen, order = order[:self.num_ids], order[self.num_ids:]
            visible_part: list[int] = []
            infrared_part: list[int] = []
            for pid_index in chosen:
                visible, infrared = self._by_pid[self._pids[pid_index]]
                visible_part.extend(_draw(rng, visible, self.per_modality))
                infrared_part.extend(_draw(rng, infrared, self.per_modality))
            batch = visible_part + infrared_part
            seeds = rng.integers(0, 2**62, size=len(batch))
            batches.append([(i, int(s)) for i, s in zip(batch, seeds)])
        return batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        mine = self.epoch_batches(self.epoch)[self.rank::self.world_size]
        yield from mine[self.position:]


def _index_by_identity(records: Sequence[ImageRecord]) -> dict[int, tuple[list[int], list[int]]]:
    visible: dict[int, list[int]] = {}
    infrared: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        (visible if r.modality == Modality.VISIBLE else infrared).setdefault(r.pid, []).append(i)
    return {pid: (visible[pid], infrared[pid]) for pid in sorted(visible) if pid in infrared}


def _draw(rng: np.random.Generator, pool: list[int], count: int) -> list[int]:
    picked = rng.choice(len(pool), size=count, replace=len(pool) < count)
    return [pool[int(j)] for j in picked]
