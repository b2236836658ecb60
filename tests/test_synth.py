"""Synthetic visible-infrared datasets: determinism, real on-disk layouts, resumable writing, no colour in IR."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vireid.cli import main
from vireid.data.datasets import build_dataset
from vireid.data.records import Modality
from vireid.data.synthetic import (
    COMPLETE_MARKER, Difficulty, ImageJob, ImageRenderer, SynthConfig, contact_sheet, render_dataset,
)
from vireid.data.synthetic.identity import sample_identity
from vireid.data.synthetic.writer import PARTIAL_MARKER
from vireid.errors import InputError

SMALL = {"height": 64, "width": 32}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    roots = {}
    for layout, ids, per_camera in (("sysu", 10, 2), ("regdb", 6, 10), ("llcm", 9, 2)):
        root = tmp_path_factory.mktemp(layout)
        render_dataset(SynthConfig(layout, ids, seed=3, images_per_camera=per_camera, **SMALL), root, workers=1)
        roots[layout] = root
    return roots


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    config = SynthConfig("sysu", 5, seed=11, images_per_camera=2, **SMALL)
    render_dataset(config, tmp_path / "a", workers=1)
    render_dataset(config, tmp_path / "b", workers=1)
    render_dataset(dataclasses.replace(config, seed=12), tmp_path / "c", workers=1)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    images = [k for k in a if k.endswith(".jpg")]
    assert images and all(a[k] != c.get(k) for k in images if k in c)


def test_parallel_workers_write_the_same_bytes(tmp_path: Path) -> None:
    config = SynthConfig("sysu", 12, seed=5, images_per_camera=4, **SMALL)
    assert len(config.plan().jobs) >= 200
    render_dataset(config, tmp_path / "one", workers=1)
    render_dataset(config, tmp_path / "two", workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_sysu_layout_is_read_by_the_real_adapter(rendered: dict[str, Path]) -> None:
    root = rendered["sysu"]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "exp"]
    splits = {}
    for split in ("train", "val", "test"):
        lines = (root / "exp" / f"{split}_id.txt").read_text().splitlines()
        assert len(lines) == 1 and re.fullmatch(r"\d+(,\d+)*", lines[0])
        splits[split] = [int(x) for x in lines[0].split(",")]
    assert sorted(sum(splits.values(), [])) == list(range(1, 11))
    for image in root.glob("cam*/*/*"):
        assert re.fullmatch(r"cam[1-6]/\d{4}/\d{4}\.jpg", str(image.relative_to(root)))
    for pid in range(1, 11):
        cams = {int(p.parent.name[3:]) for p in root.glob(f"cam*/{pid:04d}")}
        assert cams & {1, 2, 4, 5} and cams & {3, 6}
    assert _pixels(next(root.glob("cam1/*/0001.jpg"))).shape == (64, 32, 3)
    dataset = build_dataset("sysu", root)
    assert dataset.test_ids == tuple(sorted(splits["test"]))
    assert dataset.num_train_ids == len(splits["train"]) + len(splits["val"])
    assert {r.modality for r in dataset.test} == {Modality.VISIBLE, Modality.INFRARED}


def test_indoor_cameras_see_only_part_of_the_identities(tmp_path: Path) -> None:
    plan = SynthConfig("sysu", 60, seed=1, images_per_camera=1).plan()
    present = {cam: {job.pid for job in plan.jobs if job.cam == cam} for cam in range(1, 7)}
    assert 10 < len(present[1]) < 50 and 10 < len(present[2]) < 50
    assert len(present[4]) > len(present[1])


def test_regdb_layout_has_ten_half_half_trials(rendered: dict[str, Path]) -> None:
    root = rendered["regdb"]
    line = re.compile(r"(Visible|Thermal)/(\d+)/(male|female)_(front|back)_([vt])_\d{5}_(\d+)\.bmp (\d+)")
    for trial in range(1, 11):
        ids = {}
        for split in ("train", "test"):
            for name, folder, letter in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
                entries = [line.fullmatch(x) for x in (root / "idx" / f"{split}_{name}_{trial}.txt").read_text().splitlines()]
                assert all(entries)
                assert {m.group(1) for m in entries} == {folder} and {m.group(5) for m in entries} == {letter}
                assert all(m.group(2) == m.group(6) for m in entries)
                pids = sorted({int(m.group(2)) for m in entries})
                labels = {int(m.group(2)): int(m.group(7)) for m in entries}
                assert [labels[p] for p in pids] == list(range(len(pids)))
                assert all(sum(int(m.group(2)) == p for m in entries) == 10 for p in pids)
                assert all((root / m.group(0).split()[0]).is_file() for m in entries)
                ids[split] = pids
        assert len(ids["train"]) == len(ids["test"]) == 3 and not set(ids["train"]) & set(ids["test"])
    assert _pixels(next((root / "Thermal").rglob("*.bmp"))).shape == (64, 32, 3)
    dataset = build_dataset("regdb", root, trial=4)
    assert len(dataset.trial_tests) == 10 and len(dataset.test) == 3 * 20


def test_llcm_layout_is_read_by_the_real_adapter(rendered: dict[str, Path]) -> None:
    root = rendered["llcm"]
    name = r"(\d{4})_c(\d{2})_s\d{6}_f\d{4}_(vis|nir)\.jpg"
    for index, suffix in (("train_vis.txt", "vis"), ("train_nir.txt", "nir")):
        for entry in (root / "idx" / index).read_text().splitlines():
            match = re.fullmatch(rf"{suffix}/(\d{{4}})/{name} (\d+)", entry)
            assert match and match.group(1) == match.group(2) and match.group(4) == suffix
    test_line = (root / "idx" / "test_id.txt").read_text().splitlines()
    assert len(test_line) == 1
    test_ids = [int(x) for x in test_line[0].split(",")]
    for image in root.glob("test_*/cam*/*/*"):
        match = re.fullmatch(rf"test_(vis|nir)/cam(\d)/(\d{{4}})/{name}", str(image.relative_to(root)))
        assert match and int(match.group(3)) in test_ids and match.group(3) == match.group(4)
        assert int(match.group(2)) == int(match.group(5)) and match.group(1) == match.group(6)
    assert not list(root.glob("test_nir/cam3"))
    dataset = build_dataset("llcm", root)
    assert dataset.test_ids == tuple(test_ids)
    assert dataset.num_train_ids == 9 - len(test_ids)


def test_infrared_images_have_no_hue(rendered: dict[str, Path]) -> None:
    infrared = [*rendered["sysu"].glob("cam[36]/*/*.jpg"), *rendered["regdb"].glob("Thermal/*/*.bmp"),
                *rendered["llcm"].glob("nir/*/*.jpg"), *rendered["llcm"].glob("test_nir/*/*/*.jpg")]
    visible = [*rendered["sysu"].glob("cam[1245]/*/*.jpg"), *rendered["regdb"].glob("Visible/*/*.bmp")]
    assert infrared and visible
    for path in infrared:
        pixels = _pixels(path).astype(int)
        assert pixels.ndim == 3 and pixels.shape[2] == 3
        assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    chroma = [np.abs(np.diff(_pixels(p).astype(int), axis=2)).mean() for p in visible]
    assert min(chroma) > 1.0


def test_garment_colour_does_not_reach_the_infrared_image() -> None:
    config = SynthConfig("sysu", 8, seed=2, **SMALL)
    renderer = ImageRenderer(config, config.plan().cameras)
    ident = renderer.identity(1)
    recoloured = dataclasses.replace(ident, outfit=dataclasses.replace(
        ident.outfit,
        upper=dataclasses.replace(ident.outfit.upper, colour=(1.0, 0.0, 0.0), pattern_colour=(0.0, 0.0, 1.0)),
        lower=dataclasses.replace(ident.outfit.lower, colour=(0.0, 1.0, 0.0))))
    for cam, modality in ((3, Modality.INFRARED), (6, Modality.INFRARED), (1, Modality.VISIBLE)):
        job = ImageJob("", 1, cam, modality, 1)
        original, changed = renderer.render(job), renderer.render(job, recoloured)
        assert np.array_equal(original, changed) == (modality == Modality.INFRARED)


def test_skin_is_warmer_than_clothing_and_thermal_level_ignores_hue() -> None:
    difficulty = Difficulty()
    idents = [sample_identity(0, pid, 300, difficulty) for pid in range(1, 301)]
    for ident in idents:
        for garment in (ident.outfit.upper, ident.outfit.lower):
            assert garment.temperature(ident.skin_temperature) < ident.skin_temperature - 0.05
    brightness = np.array([np.mean(i.outfit.upper.colour) for i in idents])
    level = np.array([i.outfit.upper.temperature(i.skin_temperature) for i in idents])
    assert abs(np.corrcoef(brightness, level)[0, 1]) < 0.2


@pytest.mark.parametrize("coupling", [0.5, 1.0])
def test_luminance_coupling_makes_light_garments_light_in_infrared(coupling: float) -> None:
    def upper_levels(difficulty: Difficulty) -> tuple[np.ndarray, np.ndarray]:
        idents = [sample_identity(0, pid, 300, difficulty) for pid in range(1, 301)]
        luminance = np.array([np.dot(i.outfit.upper.colour, (0.299, 0.587, 0.114)) for i in idents])
        return luminance, np.array([i.outfit.upper.temperature(i.skin_temperature) for i in idents])

    independent = upper_levels(Difficulty())
    luminance, level = upper_levels(Difficulty(infrared_luminance_coupling=coupling))
    assert np.array_equal(luminance, independent[0])  # colours are untouched
    assert abs(np.corrcoef(*independent)[0, 1]) < 0.2
    assert np.corrcoef(luminance, level)[0, 1] > (0.99 if coupling == 1.0 else 0.4)
    with pytest.raises(InputError, match="infrared_luminance_coupling"):
        Difficulty(infrared_luminance_coupling=1.5)


def test_shared_outfits_create_confusers_with_different_bodies() -> None:
    difficulty = Difficulty(shared_outfit_fraction=1.0, outfit_group_size=4)
    idents = [sample_identity(0, pid, 40, difficulty) for pid in range(1, 41)]
    patterns = {}
    for ident in idents:
        patterns.setdefault((ident.outfit.upper.pattern, ident.outfit.upper.pattern_period), []).append(ident)
    groups = [g for g in patterns.values() if len(g) > 1]
    assert groups
    for group in groups:
        colours = np.array([g.outfit.upper.colour for g in group])
        assert np.abs(colours - colours[0]).max() < 0.25
        assert len({round(g.shoulder_width, 6) for g in group}) == len(group)


def test_interrupted_render_resumes_to_identical_files(tmp_path: Path) -> None:
    config = SynthConfig("llcm", 6, seed=4, images_per_camera=2, **SMALL)
    render_dataset(config, tmp_path / "full", workers=1)
    root = tmp_path / "cut"
    render_dataset(config, root, workers=1)
    complete = root / COMPLETE_MARKER
    (root / PARTIAL_MARKER).write_text(complete.read_text())
    complete.unlink()
    removed = sorted(root.rglob("*.jpg"))[::5]
    for image in removed:
        image.unlink()
    (root / "idx" / "train_vis.txt").unlink()
    summary = render_dataset(config, root, workers=1)
    assert summary.rendered == len(removed)
    assert not (root / PARTIAL_MARKER).exists()
    assert _files(root) == _files(tmp_path / "full")


def test_complete_set_is_not_rendered_again_and_other_options_need_overwrite(tmp_path: Path) -> None:
    config = SynthConfig("sysu", 6, seed=0, images_per_camera=2, **SMALL)
    render_dataset(config, tmp_path, workers=1)
    assert render_dataset(config, tmp_path, workers=1).rendered == 0
    next(tmp_path.glob("cam3/*/0002.jpg")).unlink()
    assert render_dataset(config, tmp_path, workers=1).rendered == 1
    smaller = dataclasses.replace(config, num_ids=4)
    with pytest.raises(InputError, match="num_ids"):
        render_dataset(smaller, tmp_path, workers=1)
    render_dataset(smaller, tmp_path, workers=1, overwrite=True)
    assert not list(tmp_path.glob("cam*/0005")) and not list(tmp_path.glob("cam*/0006"))
    assert build_dataset("sysu", tmp_path).num_train_ids + len(build_dataset("sysu", tmp_path).test_ids) == 4


def test_refuses_a_folder_that_is_not_a_synthetic_set(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        render_dataset(SynthConfig("regdb", 4, **SMALL), tmp_path, workers=1, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, key", [
    ({"noise": -1.0}, "noise"), ({"clutter": 1.5}, "clutter"), ({"outfit_group_size": 1}, "outfit_group_size"),
    ({"shared_outfit_fraction": float("nan")}, "shared_outfit_fraction"),
])
def test_bad_difficulty_names_the_knob(kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(InputError, match=key):
        Difficulty(**kwargs)


def test_contact_sheet_shows_every_camera(tmp_path: Path) -> None:
    config = SynthConfig("sysu", 10, seed=0, **SMALL)
    width, height = contact_sheet(config, [1, 2, 3], tmp_path / "sheet.png", zoom=1)
    pixels = _pixels(tmp_path / "sheet.png")
    assert pixels.shape == (height, width, 3) and height >= 3 * 64 and width >= 6 * 32
    with pytest.raises(InputError, match="person ids"):
        contact_sheet(config, [11], tmp_path / "bad.png")


def test_cli_renders_and_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "regdb"
    args = ["synth", "--layout", "regdb", "--out", str(out), "--ids", "4", "--height", "64", "--width", "32"]
    assert main(args) == 0
    assert (out / COMPLETE_MARKER).is_file() and len(list(out.rglob("*.bmp"))) == 80
    assert main(args[:-4] + ["--clutter", "2"]) == 2
    assert "difficulty.clutter" in capsys.readouterr().err
