"""Identity-balanced cross-modality sampler: composition, epoch length, determinism, resume, DDP slices."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vireid.data.records import ImageRecord, Modality
from vireid.data.sampler import CrossModalityBatchSampler
from vireid.errors import InputError


def _records(ids: int = 6, visible: int = 5, infrared: int = 3) -> list[ImageRecord]:
    out = []
    for pid in range(ids):
        out += [ImageRecord(Path(f"v{pid}_{k}.jpg"), 100 + pid, 1, Modality.VISIBLE) for k in range(visible)]
        out += [ImageRecord(Path(f"i{pid}_{k}.jpg"), 100 + pid, 3, Modality.INFRARED) for k in range(infrared)]
    return out


def test_batch_composition() -> None:
    """All visible images first (identity by identity, per_modality each), then the infrared
    images of the same identities in the same order."""
    records = _records()
    sampler = CrossModalityBatchSampler(records, num_ids=3, per_modality=4, seed=0)
    for batch in sampler:
        assert len(batch) == 24 == sampler.batch_size
        visible, infrared = [records[i] for i, _ in batch[:12]], [records[i] for i, _ in batch[12:]]
        assert all(r.modality == Modality.VISIBLE for r in visible)
        assert all(r.modality == Modality.INFRARED for r in infrared)
        for block in range(3):
            v_ids = {r.pid for r in visible[block * 4:(block + 1) * 4]}
            i_ids = {r.pid for r in infrared[block * 4:(block + 1) * 4]}
            assert len(v_ids) == 1 and v_ids == i_ids
        assert len({r.pid for r in visible}) == 3
        # visible has 5 >= 4 images per id: drawn without replacement
        for block in range(3):
            assert len({i for i, _ in batch[block * 4:(block + 1) * 4]}) == 4


def test_epoch_length_definitions() -> None:
    records = _records(ids=7, visible=5, infrared=3)
    by_images = CrossModalityBatchSampler(records, num_ids=2, per_modality=2, epoch_length="images")
    assert len(by_images) == math.ceil(35 / 4)
    assert len(list(by_images)) == len(by_images)
    by_ids = CrossModalityBatchSampler(records, num_ids=2, per_modality=2, epoch_length="identities")
    assert len(by_ids) == 4
    seen = [records[i].pid for batch in by_ids for i, _ in batch]
    assert set(seen) == {100 + p for p in range(7)}


def test_identities_balanced_within_epoch() -> None:
    records = _records(ids=6)
    sampler = CrossModalityBatchSampler(records, num_ids=2, per_modality=2, epoch_length="images")
    batches = list(sampler)[:3]  # 3 batches x 2 ids = every identity exactly once
    pids = [records[b[k][0]].pid for b in batches for k in (0, 2)]
    assert sorted(pids) == [100 + p for p in range(6)]


def test_deterministic_and_epoch_dependent() -> None:
    records = _records()
    a = CrossModalityBatchSampler(records, 2, 2, seed=5)
    b = CrossModalityBatchSampler(records, 2, 2, seed=5)
    assert list(a) == list(b)
    b.set_state(epoch=1)
    assert list(a) != list(b)
    c = CrossModalityBatchSampler(records, 2, 2, seed=6)
    assert list(c) != list(a)


def test_resume_mid_epoch() -> None:
    records = _records()
    sampler = CrossModalityBatchSampler(records, 2, 2, seed=1)
    sampler.set_state(epoch=2)
    full = list(sampler)
    resumed = CrossModalityBatchSampler(records, 2, 2, seed=1)
    resumed.set_state(epoch=2, position=3)
    resumed.load_state_dict(resumed.state_dict())
    assert list(resumed) == full[3:]
    with pytest.raises(InputError, match="seed"):
        CrossModalityBatchSampler(records, 2, 2, seed=2).load_state_dict(resumed.state_dict())


def test_distributed_ranks_train_whole_batches_of_one_sequence() -> None:
    """Each rank gets full num_ids x (K + K) batches; rank r takes batches r, r + W, ... of the
    sequence one process trains on, and the epoch is divided between the ranks."""
    records = _records(ids=6, visible=5, infrared=3)
    single = CrossModalityBatchSampler(records, 2, 2, seed=3)
    assert len(single) == math.ceil(30 / 4) == 8
    sequence = single.epoch_batches(0)
    for world in (2, 3):
        parts = [list(CrossModalityBatchSampler(records, 2, 2, seed=3, rank=r, world_size=world)) for r in range(world)]
        assert {len(p) for p in parts} == {math.ceil(8 / world)}
        for r, part in enumerate(parts):
            for step, batch in enumerate(part):
                assert batch == sequence[step * world + r] if step * world + r < len(sequence) else len(batch) == 8
                assert len({records[i].pid for i, _ in batch}) == 2
    resumed = CrossModalityBatchSampler(records, 2, 2, seed=3, rank=1, world_size=2)
    resumed.set_state(epoch=0, position=2)
    assert list(resumed) == [sequence[5], sequence[7]]


def test_identities_missing_a_modality_are_skipped() -> None:
    records = _records(ids=3) + [ImageRecord(Path("only_vis.jpg"), 999, 1, Modality.VISIBLE)]
    sampler = CrossModalityBatchSampler(records, 3, 1)
    assert all(records[i].pid != 999 for batch in sampler for i, _ in batch)
    with pytest.raises(InputError, match="identities"):
        CrossModalityBatchSampler(records, 4, 1)
