"""Evaluation protocols: golden SYSU-MM01 galleries, RegDB/LLCM/market on tiny real-layout trees,
and the multi-trial feature file built from a protocol."""

from __future__ import annotations

import json
import lzma
import os
import random
from pathlib import Path

import numpy as np
import pytest

from test_datasets import LLCM_TEST_IDS, error_of, make_llcm_tree, make_manifest, make_regdb_tree, make_sysu_tree
from vireid.data.datasets import build_dataset
from vireid.data.protocols import (
    build_protocol, llcm_protocol, official_sysu_permutations, protocol_feature_set, protocol_images,
    regdb_protocol, seeded_sysu_permutations, sysu_agw_protocol, sysu_official_protocol,
)
from vireid.data.records import Modality
from vireid.features import load_features, save_features

# ----------------------------------------------------------------------------- SYSU-MM01 golden


@pytest.fixture(scope="module")
def golden_sampling(golden_dir: Path) -> dict:
    return json.loads(lzma.decompress((golden_dir / "sysu_gallery_sampling.json.xz").read_bytes()))


@pytest.fixture(scope="module")
def fake_sysu_root(golden_sampling: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's fake tree (``camC/PPPP/0001.jpg .. <n>.jpg``) for the test identities, plus two
    training identities so that the adapter reads it like a real SYSU-MM01 root."""
    root = tmp_path_factory.mktemp("sysu_fake")
    test_ids = set(golden_sampling["test_ids"])
    pids = sorted({int(key.split("/")[1]) for key in golden_sampling["tree"]})
    train_ids = [p for p in pids if p not in test_ids][:2]
    for key, n in golden_sampling["tree"].items():
        if int(key.split("/")[1]) in test_ids | set(train_ids):
            folder = root / key
            folder.mkdir(parents=True)
            for i in range(1, n + 1):
                os.close(os.open(folder / f"{i:04d}.jpg", os.O_CREAT | os.O_WRONLY))
    (root / "exp").mkdir()
    (root / "exp" / "test_id.txt").write_text(golden_sampling["test_id_txt"])
    (root / "exp" / "train_id.txt").write_text(str(train_ids[0]))
    (root / "exp" / "val_id.txt").write_text(str(train_ids[1]))
    return root


@pytest.fixture(scope="module")
def fake_sysu(fake_sysu_root: Path):
    return build_dataset("sysu", fake_sysu_root)


def relative(records, root: Path) -> list[str]:
    prefix = len(str(root)) + 1
    return [str(r.path)[prefix:] for r in records]


def test_sysu_official_reproduces_all_40_golden_galleries(fake_sysu, fake_sysu_root: Path, golden_sampling: dict) -> None:
    ds = fake_sysu
    assert list(ds.test_ids) == golden_sampling["test_ids"]
    for mode in ("all", "indoor"):
        for shots in ("1", "10"):
            protocol = build_protocol("sysu", ds, mode=mode, shots=int(shots))
            assert protocol.metric == "sysu" and len(protocol.trials) == 10
            assert relative(protocol.trials[0].query, fake_sysu_root) == golden_sampling["query"]["official_order"]
            assert all(trial.query is protocol.trials[0].query for trial in protocol.trials)
            for t, trial in enumerate(protocol.trials):
                assert relative(trial.gallery, fake_sysu_root) == golden_sampling["official"][mode][shots][t], (mode, shots, t)


def test_sysu_agw_reproduces_all_20_golden_galleries(fake_sysu, fake_sysu_root: Path, golden_sampling: dict) -> None:
    ds = fake_sysu
    for mode in ("all", "indoor"):
        protocol = build_protocol("sysu-agw", ds, mode=mode)
        assert [len(t.gallery) for t in protocol.trials] == [301 if mode == "all" else 112] * 10
        assert relative(protocol.trials[0].query, fake_sysu_root) == golden_sampling["query"]["agw_order"]
        assert all(trial.query is protocol.trials[0].query for trial in protocol.trials)
        for t, trial in enumerate(protocol.trials):
            assert relative(trial.gallery, fake_sysu_root) == golden_sampling["agw"][mode][t], (mode, t)


def test_official_permutation_table_matches_the_golden_tree(golden_sampling: dict) -> None:
    table = official_sysu_permutations()
    sizes = {f"cam{cam}/{pid:04d}": perm.shape[1] for (cam, pid), perm in table.items()}
    assert sizes == golden_sampling["tree"]
    assert all(perm.shape[0] == 10 and sorted(perm[3]) == list(range(1, perm.shape[1] + 1)) for perm in table.values())


# ----------------------------------------------------------------------------- SYSU-MM01 tiny tree


def test_sysu_official_rejects_a_tree_that_is_not_sysu(tmp_path: Path) -> None:
    ds = build_dataset("sysu", make_sysu_tree(tmp_path))
    message = error_of(build_protocol, "sysu", ds)
    assert message.startswith("cam1/0004: 5 images, but the SYSU-MM01 permutation table expects 29;")
    assert "permutations='seeded'" in message


def test_sysu_seeded_permutations_on_a_tiny_tree(tmp_path: Path) -> None:
    ds = build_dataset("sysu", make_sysu_tree(tmp_path))
    one = build_protocol("sysu", ds, mode="all", shots=1, permutations="seeded", seed=3)
    again = build_protocol("sysu", ds, mode="all", shots=1, permutations="seeded", seed=3)
    assert one == again == sysu_official_protocol(ds.test, permutations="seeded", seed=3)
    assert one.params == {"mode": "all", "shots": 1, "trials": list(range(10)), "permutations": "seeded", "seed": 3}
    trial = one.trials[0]
    # person 5 has no cam2 folder: 4 cams x 2 people - 1
    assert len(trial.gallery) == 7
    assert [(r.cam, r.pid) for r in trial.gallery] == [(1, 4), (1, 5), (2, 4), (4, 4), (4, 5), (5, 4), (5, 5)]
    assert [(r.cam, r.pid) for r in trial.query] == sorted((r.cam, r.pid) for r in trial.query)
    assert {r.cam for r in trial.query} == {3, 6} and all(r.modality == Modality.INFRARED for r in trial.query)
    multi = build_protocol("sysu", ds, mode="indoor", shots=10, permutations="seeded", seed=3)
    # 10-shot takes every image when a camera has fewer than 10
    assert len(multi.trials[4].gallery) == sum(1 for r in ds.test if r.cam in (1, 2))
    galleries = {tuple(t.gallery) for t in one.trials}
    assert len(galleries) > 1
    table = seeded_sysu_permutations([r for r in ds.test if r.cam == 1], seed=3)
    assert table[(1, 4)].shape == (10, 5)


def test_sysu_agw_draws_like_global_random_seed(tmp_path: Path) -> None:
    root = make_sysu_tree(tmp_path)
    ds = build_dataset("sysu", root)
    protocol = sysu_agw_protocol(ds.test, mode="all", trials=[0, 7])
    for trial, seed in zip(protocol.trials, (0, 7)):
        random.seed(seed)
        expected = []
        for pid in ("0004", "0005"):
            for cam in ("cam1", "cam2", "cam4", "cam5"):
                folder = root / cam / pid
                if folder.is_dir():
                    expected.append(random.choice(sorted(str(folder / f) for f in os.listdir(folder))))
        assert [str(r.path) for r in trial.gallery] == expected


def test_sysu_bad_parameters(tmp_path: Path) -> None:
    ds = build_dataset("sysu", make_sysu_tree(tmp_path))
    assert error_of(build_protocol, "sysu", ds, shots=3) == "SYSU shots must be 1 (single-shot) or 10 (multi-shot), got 3"
    assert error_of(build_protocol, "sysu-agw", ds, mode="outdoor") == "SYSU mode must be one of all, indoor, got 'outdoor'"
    assert error_of(build_protocol, "sysu", ds, trials=[10]) == "SYSU protocol: trial 10 out of range 0..9"
    assert error_of(build_protocol, "sysu", ds, shot=1) == (
        "protocol sysu: unknown parameter 'shot' (did you mean 'shots'?) "
        "(accepted: mode, shots, trials, permutations, seed)")
    assert error_of(build_protocol, "sysu_agw", ds) == (
        "unknown protocol 'sysu_agw' (did you mean 'sysu-agw'?) (choose from sysu, sysu-agw, regdb, llcm, market)")


# ----------------------------------------------------------------------------- RegDB


def test_regdb_directions_swap_records_with_their_ids(tmp_path: Path) -> None:
    ds = build_dataset("regdb", make_regdb_tree(tmp_path))
    v2t = build_protocol("regdb", ds)
    t2v = build_protocol("regdb", ds, direction="thermal-visible")
    assert len(v2t.trials) == 10 and v2t.metric == "regdb"
    for a, b, t in zip(v2t.trials, t2v.trials, range(1, 11)):
        assert a.query == b.gallery and a.gallery == b.query
        assert {r.modality for r in a.query} == {Modality.VISIBLE}
        assert {r.modality for r in b.query} == {Modality.INFRARED}
        assert set(a.query) | set(a.gallery) == set(ds.trial_tests[t - 1])
    # a query's id is the id of its own image, in both directions
    for trial in (v2t.trials[3], t2v.trials[3]):
        for record in trial.query + trial.gallery:
            assert record.path.parent.name == {0: "103", 1: "104"}[record.pid]
    only = regdb_protocol(ds.trial_tests, trials=[2])
    assert only.trials[0] == v2t.trials[1] and only.params == {"direction": "visible-thermal", "trials": [2]}
    assert error_of(build_protocol, "regdb", ds, direction="v2t") == (
        "RegDB direction must be one of visible-thermal, thermal-visible, got 'v2t'")


# ----------------------------------------------------------------------------- LLCM


def reference_llcm_gallery(root: Path, folder: str, cams: list[str], trial: int) -> list[str]:
    """The draw order of ZYK100/LLCM ``process_gallery_llcm`` on a tree, with the global RNG."""
    random.seed(trial)
    ids = ["%04d" % i for i in LLCM_TEST_IDS]
    chosen = []
    for pid in sorted(ids):
        for cam in cams:
            img_dir = root / folder / cam / pid
            if img_dir.is_dir():
                chosen.append(random.choice(sorted(str(img_dir) + "/" + f for f in os.listdir(img_dir))))
    return chosen


@pytest.mark.parametrize(("direction", "gallery_folder", "cams"), [
    ("infrared-visible", "test_vis", ["cam1", "cam2", "cam3"]),
    ("visible-infrared", "test_nir", ["cam1", "cam2", "cam4"]),
])
def test_llcm_seeded_galleries_follow_the_reference(tmp_path: Path, direction: str, gallery_folder: str, cams: list[str]) -> None:
    root = make_llcm_tree(tmp_path)
    ds = build_dataset("llcm", root)
    protocol = build_protocol("llcm", ds, direction=direction)
    assert protocol.metric == "llcm" and len(protocol.trials) == 10
    query_modality = Modality.INFRARED if direction == "infrared-visible" else Modality.VISIBLE
    for t, trial in enumerate(protocol.trials):
        assert [str(r.path) for r in trial.gallery] == reference_llcm_gallery(root, gallery_folder, cams, t)
        assert trial.query == tuple(r for r in ds.test if r.modality == query_modality)
    assert llcm_protocol(ds.test, direction=direction) == protocol


# ----------------------------------------------------------------------------- market


def test_market_protocol_uses_the_manifest_split(tmp_path: Path) -> None:
    ds = build_dataset("manifest", make_manifest(tmp_path))
    protocol = build_protocol("market", ds)
    assert protocol.metric == "market" and len(protocol.trials) == 1
    assert protocol.trials[0].query == ds.query and protocol.trials[0].gallery == ds.gallery
    no_split = build_dataset("llcm", make_llcm_tree(tmp_path / "llcm"))
    assert error_of(build_protocol, "market", no_split) == (
        "market protocol: the dataset defines no query/gallery split (manifest split column)")


# ----------------------------------------------------------------------------- feature file


def test_protocol_feature_set_round_trip(tmp_path: Path) -> None:
    root = make_llcm_tree(tmp_path / "llcm")
    ds = build_dataset("llcm", root)
    protocol = build_protocol("llcm", ds, trials=[0, 1, 2])
    queries, galleries = protocol_images(protocol)
    assert len(set(queries)) == len(queries) and set(queries) == set(protocol.trials[0].query)
    assert set(galleries) == {r for t in protocol.trials for r in t.gallery}
    rng = np.random.default_rng(0)
    qf = rng.normal(size=(len(queries), 4)).astype(np.float32)
    gf = rng.normal(size=(len(galleries), 4)).astype(np.float32)
    fs = protocol_feature_set(protocol, qf, gf, root=root, meta={"checkpoint": "x.pt"})
    path = tmp_path / "features.npz"
    save_features(path, fs)
    loaded = load_features(path)
    assert loaded.num_trials == 3
    assert loaded.meta == {"checkpoint": "x.pt", "protocol": {"name": "llcm", "metric": "llcm",
                                                              "direction": "infrared-visible", "trials": [0, 1, 2]}}
    for t, trial in enumerate(protocol.trials):
        view = loaded.trial(t)
        assert view.gallery_id.tolist() == [r.pid for r in trial.gallery]
        assert view.gallery_cam.tolist() == [r.cam for r in trial.gallery]
        assert view.query_id.tolist() == [r.pid for r in trial.query]
        assert view.extras["gallery_path"].tolist() == [r.path.relative_to(root).as_posix() for r in trial.gallery]
        rows = [galleries.index(r) for r in trial.gallery]
        np.testing.assert_array_equal(view.gallery_feat, gf[rows])
    assert error_of(protocol_feature_set, protocol, qf[:-1], gf) == (
        f"query_feat has shape {(len(queries) - 1, 4)}, but protocol llcm has {len(queries)} query images")
    assert error_of(protocol_feature_set, protocol, qf, gf, root=tmp_path / "elsewhere") == (
        f"image {queries[0].path} is not under the folder {tmp_path / 'elsewhere'} given as root")


def test_protocol_feature_set_pads_ragged_trials(tmp_path: Path) -> None:
    ds = build_dataset("regdb", make_regdb_tree(tmp_path))
    ragged = build_dataset("regdb", make_regdb_tree(tmp_path / "r2", per_id=1))
    protocol = regdb_protocol((ds.trial_tests[0], ragged.trial_tests[1]), trials=[1, 2])
    queries, galleries = protocol_images(protocol)
    fs = protocol_feature_set(protocol, np.zeros((len(queries), 2)), np.zeros((len(galleries), 2)))
    assert fs.trial_query_index.shape == (2, 4)
    assert fs.trial_query_index[1].tolist()[2:] == [-1, -1]
    assert fs.trial(1).query_id.tolist() == [r.pid for r in protocol.trials[1].query]
