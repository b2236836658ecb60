"""Dataset adapters on tiny trees in the exact real layouts, and on malformed ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from vireid.data.datasets import build_dataset
from vireid.data.datasets.llcm import load_llcm
from vireid.data.datasets.manifest import load_manifest
from vireid.data.datasets.regdb import load_regdb
from vireid.data.datasets.sysu import load_sysu
from vireid.data.records import Modality
from vireid.errors import InputError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# ----------------------------------------------------------------------------- tree builders


def make_sysu_tree(root: Path, train=(1, 2), val=(3,), test=(4, 5), images: int = 3) -> Path:
    """``cam1..cam6/<pid:04d>/<idx:04d>.jpg`` + ``exp/*_id.txt``; person 5 has no cam2 folder."""
    for pid in (*train, *val, *test):
        for cam in range(1, 7):
            if pid == 5 and cam == 2:
                continue
            for i in range(1, images + 1 + (pid + cam) % 3):
                touch(root / f"cam{cam}" / f"{pid:04d}" / f"{i:04d}.jpg")
    (root / "exp").mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        (root / "exp" / f"{name}_id.txt").write_text(",".join(str(i) for i in ids) + "\n")
    return root


REGDB_IDS = (101, 102, 103, 104)


def make_regdb_tree(root: Path, per_id: int = 2) -> Path:
    """``Visible/<id>/*.bmp``, ``Thermal/<id>/*.bmp`` and 40 index files; trial t trains on two
    identities and tests on the other two (chosen by t), labels = position in the split."""
    for pid in REGDB_IDS:
        for i in range(per_id):
            touch(root / "Visible" / str(pid) / f"female_front_v_{i:05d}_{pid}.bmp")
            touch(root / "Thermal" / str(pid) / f"female_front_t_{i:05d}_{pid}.bmp")
    (root / "idx").mkdir(parents=True, exist_ok=True)
    for t in range(1, 11):
        shift = t % len(REGDB_IDS)
        order = REGDB_IDS[shift:] + REGDB_IDS[:shift]
        for split, ids in (("train", order[:2]), ("test", order[2:])):
            for modality, folder, letter in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
                lines = [f"{folder}/{pid}/female_front_{letter}_{i:05d}_{pid}.bmp {label}"
                         for label, pid in enumerate(ids) for i in range(per_id)]
                (root / "idx" / f"{split}_{modality}_{t}.txt").write_text("\n".join(lines) + "\n")
    return root


LLCM_TEST_IDS = (7, 9)


def make_llcm_tree(root: Path) -> Path:
    """LLCM release layout: train index files, test_id.txt and test_{vis,nir}/cam*/<pid>/."""
    lines = {"vis": [], "nir": []}
    for label, pid in enumerate((1, 2)):
        for modality in ("vis", "nir"):
            for cam in (1, 2):
                rel = f"{modality}/{pid:04d}/{pid:04d}_c{cam:02d}_s18553{cam}_f77{pid}_{modality}.jpg"
                touch(root / rel)
                lines[modality].append(f"{rel} {label}")
    (root / "idx").mkdir(parents=True, exist_ok=True)
    (root / "idx" / "train_vis.txt").write_text("\n".join(lines["vis"]) + "\n")
    (root / "idx" / "train_nir.txt").write_text("\n".join(lines["nir"]) + "\n")
    (root / "idx" / "test_id.txt").write_text(",".join(str(i) for i in LLCM_TEST_IDS) + "\n")
    cams = {"test_vis": (1, 2, 3), "test_nir": (1, 2, 4)}
    for folder, cam_list in cams.items():
        for cam in cam_list:
            for pid in LLCM_TEST_IDS:
                for i in range(1 + (pid + cam) % 4):
                    touch(root / folder / f"cam{cam}" / f"{pid:04d}" / f"{pid:04d}_c{cam:02d}_s{i}_f{i}.jpg")
    return root


def make_manifest(root: Path) -> Path:
    rows = ["path,person_id,camera,modality,split"]
    for pid in (1, 2):
        for cam, modality in ((1, "visible"), (2, "infrared")):
            touch(root / "imgs" / f"{pid}_{cam}.jpg")
            rows.append(f"imgs/{pid}_{cam}.jpg,{pid},{cam},{modality},train")
    for pid in (5, 6):
        touch(root / "imgs" / f"q{pid}.png")
        touch(root / "imgs" / f"g{pid}.png")
        rows.append(f"imgs/q{pid}.png,{pid},3,infrared,query")
        rows.append(f"imgs/g{pid}.png,{pid},1,visible,gallery")
    path = root / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def error_of(func, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        func(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- SYSU-MM01


def test_sysu_reads_train_val_as_training_set(tmp_path: Path) -> None:
    ds = load_sysu(make_sysu_tree(tmp_path))
    assert ds.name == "sysu" and ds.test_ids == (4, 5)
    assert sorted({r.pid for r in ds.train}) == [1, 2, 3]
    assert ds.train_labels == {1: 0, 2: 1, 3: 2}
    assert ds.train_targets()[0] == 0 and ds.train_targets()[-1] == 2
    assert {r.pid for r in ds.test} == {4, 5}
    assert all(r.modality == (Modality.INFRARED if r.cam in (3, 6) else Modality.VISIBLE) for r in ds.train + ds.test)
    first = ds.test[0]
    assert first.path == tmp_path / "cam1" / "0004" / "0001.jpg" and first.cam == 1
    keys = [(r.pid, r.cam, r.path.name) for r in ds.test]
    assert keys == sorted(keys)
    assert not any(r.pid == 5 and r.cam == 2 for r in ds.test)


def test_sysu_missing_test_id_file(tmp_path: Path) -> None:
    root = make_sysu_tree(tmp_path)
    (root / "exp" / "test_id.txt").unlink()
    assert error_of(load_sysu, root) == f"{root / 'exp' / 'test_id.txt'}: missing identity list file"


def test_sysu_bad_token_in_id_file(tmp_path: Path) -> None:
    root = make_sysu_tree(tmp_path)
    (root / "exp" / "val_id.txt").write_text("3,x7\n")
    assert error_of(load_sysu, root) == (
        f"{root / 'exp' / 'val_id.txt'}, line 1: 'x7' is not a person id (expected comma-separated integers)")


def test_sysu_id_file_with_two_lines(tmp_path: Path) -> None:
    root = make_sysu_tree(tmp_path)
    (root / "exp" / "train_id.txt").write_text("1\n2\n")
    assert "train_id.txt: expected one comma-separated line of person ids, found 2 lines" in error_of(load_sysu, root)


def test_sysu_non_numeric_person_folder(tmp_path: Path) -> None:
    root = make_sysu_tree(tmp_path)
    touch(root / "cam4" / "00a1" / "0001.jpg")
    assert error_of(load_sysu, root) == (
        f"{root / 'cam4' / '00a1'}: person folder name must be a 4-digit id like 0001, got '00a1'")


def test_sysu_missing_camera_folder(tmp_path: Path) -> None:
    root = make_sysu_tree(tmp_path)
    for f in (root / "cam3").rglob("*.jpg"):
        f.unlink()
    for d in sorted((root / "cam3").glob("*"), reverse=True):
        d.rmdir()
    (root / "cam3").rmdir()
    assert error_of(load_sysu, root) == f"{root / 'cam3'}: missing camera cam3 folder"


def test_sysu_listed_id_without_images(tmp_path: Path) -> None:
    root = make_sysu_tree(tmp_path)
    (root / "exp" / "test_id.txt").write_text("4,5,17\n")
    assert error_of(load_sysu, root) == (
        f"{root / 'exp' / 'test_id.txt'}: person 17 has no images in any cam1..cam6/0017 folder "
        "(1 listed id(s) without images)")


def test_sysu_test_id_overlapping_training(tmp_path: Path) -> None:
    root = make_sysu_tree(tmp_path)
    (root / "exp" / "test_id.txt").write_text("2,4,5\n")
    assert "test_id.txt: person id 2 is also a train/val id" in error_of(load_sysu, root)


def test_sysu_missing_root(tmp_path: Path) -> None:
    assert error_of(load_sysu, tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: missing SYSU-MM01 root folder"


# ----------------------------------------------------------------------------- RegDB


def test_regdb_reads_the_requested_trial(tmp_path: Path) -> None:
    root = make_regdb_tree(tmp_path)
    ds = load_regdb(root, trial=3)
    assert len(ds.trial_tests) == 10 and ds.info == {"trial": 3}
    assert ds.test == ds.trial_tests[2]
    # trial 3: order = (104, 101, 102, 103): train 104, 101; test 102, 103 (labels 0, 1)
    assert {r.path.parent.name for r in ds.train} == {"104", "101"}
    assert {(r.path.parent.name, r.pid) for r in ds.test} == {("102", 0), ("103", 1)}
    visible = [r for r in ds.test if r.modality == Modality.VISIBLE]
    thermal = [r for r in ds.test if r.modality == Modality.INFRARED]
    assert {r.cam for r in visible} == {1} and {r.cam for r in thermal} == {2}
    assert visible[0].path == root / "Visible" / "102" / "female_front_v_00000_102.bmp"
    assert ds.train_labels == {0: 0, 1: 1}


def test_regdb_bad_line_names_file_and_line(tmp_path: Path) -> None:
    root = make_regdb_tree(tmp_path)
    index = root / "idx" / "test_thermal_4.txt"
    lines = index.read_text().splitlines()
    lines[2] = "Thermal/103/female_front_t_00000_103.bmp"
    index.write_text("\n".join(lines) + "\n")
    assert error_of(load_regdb, root) == (
        f"{index}, line 3: expected '<image path> <non-negative integer label>', "
        "got 'Thermal/103/female_front_t_00000_103.bmp'")


def test_regdb_line_naming_a_missing_image(tmp_path: Path) -> None:
    root = make_regdb_tree(tmp_path)
    index = root / "idx" / "train_visible_7.txt"
    index.write_text(index.read_text() + "Visible/101/nothing.bmp 0\n")
    line = len(index.read_text().splitlines())
    assert error_of(load_regdb, root) == (
        f"{index}, line {line}: image Visible/101/nothing.bmp does not exist under {root}")


def test_regdb_thermal_path_in_visible_index(tmp_path: Path) -> None:
    root = make_regdb_tree(tmp_path)
    index = root / "idx" / "test_visible_1.txt"
    index.write_text("Thermal/101/female_front_t_00000_101.bmp 0\n")
    assert error_of(load_regdb, root) == (
        f"{index}, line 1: expected a path 'Visible/<id>/<file>', got 'Thermal/101/female_front_t_00000_101.bmp'")


def test_regdb_label_shared_by_two_people(tmp_path: Path) -> None:
    root = make_regdb_tree(tmp_path)
    index = root / "idx" / "train_thermal_2.txt"
    index.write_text("Thermal/101/female_front_t_00000_101.bmp 0\nThermal/102/female_front_t_00000_102.bmp 0\n")
    assert error_of(load_regdb, root) == (
        f"{index}, line 2: label 0 is used for both Thermal/101 and Thermal/102")


def test_regdb_missing_index_file_and_bad_trial(tmp_path: Path) -> None:
    root = make_regdb_tree(tmp_path)
    assert error_of(load_regdb, root, trial=11) == "RegDB trial must be one of 1..10, got 11"
    (root / "idx" / "test_thermal_10.txt").unlink()
    assert error_of(load_regdb, root) == f"{root / 'idx' / 'test_thermal_10.txt'}: missing index file"


def test_regdb_non_numeric_person_folder(tmp_path: Path) -> None:
    root = make_regdb_tree(tmp_path)
    touch(root / "Thermal" / "abc" / "x.bmp")
    assert error_of(load_regdb, root) == f"{root / 'Thermal' / 'abc'}: person folder name must be a number, got 'abc'"


# ----------------------------------------------------------------------------- LLCM


def test_llcm_reads_train_index_and_test_folders(tmp_path: Path) -> None:
    root = make_llcm_tree(tmp_path)
    ds = load_llcm(root)
    assert ds.test_ids == LLCM_TEST_IDS
    assert len(ds.train) == 8 and ds.train_labels == {0: 0, 1: 1}
    assert {(r.modality, r.cam) for r in ds.train} == {(m, c) for m in Modality for c in (1, 2)}
    nir = [r for r in ds.train if r.modality == Modality.INFRARED]
    assert nir[0].path == root / "nir" / "0001" / "0001_c01_s185531_f771_nir.jpg"
    vis_cams = {r.cam for r in ds.test if r.modality == Modality.VISIBLE}
    nir_cams = {r.cam for r in ds.test if r.modality == Modality.INFRARED}
    assert vis_cams == {1, 2, 3} and nir_cams == {1, 2, 4}
    expected = sum(1 + (pid + cam) % 4 for pid in LLCM_TEST_IDS for cam in (1, 2, 3, 1, 2, 4))
    assert len(ds.test) == expected


def test_llcm_ignores_people_outside_test_id(tmp_path: Path) -> None:
    root = make_llcm_tree(tmp_path)
    touch(root / "test_vis" / "cam1" / "0042" / "0042_c01_s1_f1.jpg")
    assert 42 not in {r.pid for r in load_llcm(root).test}


def test_llcm_bad_camera_folder(tmp_path: Path) -> None:
    root = make_llcm_tree(tmp_path)
    (root / "test_nir" / "camera5").mkdir()
    assert error_of(load_llcm, root) == f"{root / 'test_nir' / 'camera5'}: camera folder name must be cam<N>, got 'camera5'"


def test_llcm_train_line_without_camera(tmp_path: Path) -> None:
    root = make_llcm_tree(tmp_path)
    touch(root / "vis" / "0001" / "plain.jpg")
    index = root / "idx" / "train_vis.txt"
    index.write_text("vis/0001/plain.jpg 0\n")
    assert error_of(load_llcm, root) == (
        f"{index}, line 1: cannot tell the camera of vis/0001/plain.jpg (expected '_c<N>_' in the file name "
        "or a 'cam<N>' folder)")


def test_llcm_bad_label_and_missing_test_ids(tmp_path: Path) -> None:
    root = make_llcm_tree(tmp_path)
    index = root / "idx" / "train_nir.txt"
    good = index.read_text()
    index.write_text(good.replace(" 1\n", " one\n", 1))
    line = next(i for i, l in enumerate(good.splitlines(), 1) if l.endswith(" 1"))
    assert error_of(load_llcm, root).startswith(f"{index}, line {line}: expected '<image path> <non-negative integer label>'")
    index.write_text(good)
    (root / "idx" / "test_id.txt").unlink()
    assert error_of(load_llcm, root) == f"{root / 'idx' / 'test_id.txt'}: missing identity list file"


# ----------------------------------------------------------------------------- manifest


def test_manifest_resolves_paths_and_splits(tmp_path: Path) -> None:
    path = make_manifest(tmp_path)
    ds = load_manifest(path)
    assert len(ds.train) == 4 and ds.train_labels == {1: 0, 2: 1}
    assert [r.pid for r in ds.query] == [5, 6] and [r.pid for r in ds.gallery] == [5, 6]
    assert ds.query[0].path == tmp_path / "imgs" / "q5.png" and ds.query[0].modality == Modality.INFRARED
    assert ds.test == ds.query + ds.gallery and ds.test_ids == (5, 6)


@pytest.mark.parametrize(("line", "message"), [
    ("imgs/q5.png,5,3,ultraviolet,query", "modality must be visible or infrared, got 'ultraviolet'"),
    ("imgs/q5.png,five,3,infrared,query", "person_id must be a non-negative integer, got 'five'"),
    ("imgs/q5.png,5,3,infrared,probe", "split must be train, query or gallery, got 'probe'"),
    ("imgs/none.png,5,3,infrared,query", "image {root}/imgs/none.png does not exist"),
    ("imgs/1_1.jpg,1,1,visible,train", "image {root}/imgs/1_1.jpg is already listed on line 2"),
    ("imgs/q5.png,5", "expected 5 columns, got 2"),
])
def test_manifest_bad_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    path = make_manifest(tmp_path)
    path.write_text(path.read_text() + line + "\n")
    number = len(path.read_text().splitlines())
    assert error_of(load_manifest, path) == f"{path}, line {number}: {message.format(root=tmp_path)}"


def test_manifest_header_missing_column(tmp_path: Path) -> None:
    path = make_manifest(tmp_path)
    path.write_text(path.read_text().replace("person_id", "personid", 1))
    assert error_of(load_manifest, path) == (
        f"{path}, line 1: header lacks column 'person_id' (found 'personid'); "
        "required columns: path, person_id, camera, modality, split")


# ----------------------------------------------------------------------------- registry


def test_build_dataset_by_name(tmp_path: Path) -> None:
    assert build_dataset("regdb", make_regdb_tree(tmp_path / "r"), trial=2).info == {"trial": 2}
    assert build_dataset("manifest", make_manifest(tmp_path / "m")).name == "manifest"
    assert error_of(build_dataset, "sysuu", tmp_path) == (
        "unknown dataset 'sysuu' (did you mean 'sysu'?) (choose from sysu, regdb, llcm, manifest)")
    assert error_of(build_dataset, "regdb", tmp_path, trail=2) == (
        "dataset regdb: unknown option 'trail' (did you mean 'trial'?) (accepted: trial)")
