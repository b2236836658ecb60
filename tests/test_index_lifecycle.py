"""Gallery index lifecycle: replacing and restoring a gallery, reader leases against garbage
collection, enrolment cost in proportion to the items added, compaction, verification of damaged
files, duplicates and hidden files, bad values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_serve_support import SMALL_GALLERY_PARAMS, make_checkpoint, person_image, write_gallery
from vireid.cli import main
from vireid.errors import InputError
from vireid.serve.index import (
    GalleryIndex,
    GalleryItem,
    IndexSettings,
    NewImage,
    add_to_index,
    build_index,
    collect_garbage,
    compact,
    current_version,
    restore_version,
    verify_index,
)


def _items(n: int, start: int = 0) -> list[NewImage]:
    return [NewImage(GalleryItem(name=f"item{start + i}", pid=(start + i) // 3, cam=1)) for i in range(n)]


def _image_items(pids: range, variant: int = 0) -> list[NewImage]:
    return [NewImage(GalleryItem(name=f"{pid}.jpg", pid=pid), person_image(pid, variant)) for pid in pids]


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli")
    onnx = folder / "model.onnx"
    assert main(["export", "--checkpoint", str(make_checkpoint(folder)), "--out", str(onnx)]) == 0
    write_gallery(folder / "first", range(1, 5), 3)
    write_gallery(folder / "second", range(20, 22), 2)
    assert main(["index", "build", "--model", str(onnx), "--images", str(folder / "first"), "--out", str(folder / "index")]) == 0
    return {"root": folder, "onnx": onnx, "index": folder / "index"}


def test_build_over_an_existing_index_needs_replace_and_keeps_the_old_one_until_gc(
        cli_index: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "index"
    shutil.copytree(cli_index["index"], index)
    build = ["index", "build", "--model", str(cli_index["onnx"]), "--images", str(cli_index["root"] / "second"),
             "--out", str(index)]
    capsys.readouterr()
    assert main(build) == 2
    assert "already holds an index" in capsys.readouterr().err
    assert GalleryIndex.open(index).count == 12
    first_images = {p.name for p in (index / "images").iterdir()}
    assert main([*build, "--replace"]) == 0
    assert GalleryIndex.open(index).count == 4 and current_version(index) == "v000002"
    # enrolments into the new gallery do not collect the replaced one
    assert main(["index", "add", str(index), "--images", str(cli_index["root"] / "first" / "0001_c1_00.jpg")]) == 0
    add_to_index(index, np.ones((1, 512)), _image_items(range(30, 31)))
    assert GalleryIndex.open(index).count == 6
    assert first_images <= {p.name for p in (index / "images").iterdir()}
    assert main(["index", "restore", str(index), "v000001"]) == 0
    restored = GalleryIndex.open(index)
    assert restored.count == 12 and restored.version == "v000005" and restored.item(0).name.startswith("0001_")
    verify_index(index)
    restored_images = {restored.item(i).image for i in range(12)}
    del restored
    assert main(["index", "gc", str(index)]) == 0
    assert [p.name for p in (index / "versions").glob("v*.json")] == ["v000005.json"]
    assert {p.name for p in (index / "images").iterdir()} == restored_images  # the replaced gallery's are gone
    assert verify_index(index)["count"] == 12


def test_garbage_collection_spares_versions_a_reader_holds(tmp_path: Path) -> None:
    feats = np.random.default_rng(0).standard_normal((40, 8))
    build_index(tmp_path, feats[:30], _image_items(range(1, 31)))
    reader = GalleryIndex.open(tmp_path, first_stage="scan")  # holds v000001
    build_index(tmp_path, feats[30:], _image_items(range(100, 110)), replace=True)
    collect_garbage(tmp_path)
    assert (tmp_path / "versions" / "v000001.json").is_file()
    assert [h.item.name for h in reader.search(feats[3], "plain", 1)] == ["4.jpg"]  # files still there
    assert reader.image_path(reader.item(3)).is_file()
    del reader
    collect_garbage(tmp_path)
    assert not (tmp_path / "versions" / "v000001.json").exists()
    assert len(list((tmp_path / "images").iterdir())) == 10


def test_an_enrolment_writes_bytes_in_proportion_to_the_items_added(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    written = {}
    for n in (400, 1600):
        root = tmp_path / str(n)
        feats = rng.standard_normal((n + 1, 32))
        build_index(root, feats[:n], _items(n), settings=IndexSettings(knn="exact"))
        before = {p: p.stat().st_size for p in root.rglob("*") if p.is_file()}
        add_to_index(root, feats[n:], _items(1, n))
        written[n] = sum(p.stat().st_size - before.get(p, 0) for p in root.rglob("*")
                         if p.is_file() and before.get(p) != p.stat().st_size)
    assert written[1600] < 1.5 * written[400], written  # four times the gallery, not four times the bytes
    assert written[1600] < 600_000, written  # one delta file: the rows near the new item


def test_compaction_folds_deltas_into_a_new_base_with_the_same_results(tmp_path: Path, sysu_golden) -> None:
    gallery = sysu_golden["gallery_feat"]
    build_index(tmp_path, gallery[:1000], _items(1000), settings=IndexSettings(knn="exact"))
    index = GalleryIndex.open(tmp_path, first_stage="scan")
    for start in range(1000, 1040, 4):
        index, _ = add_to_index(tmp_path, gallery[start:start + 4], _items(4, start), current=index)
    assert len(index.manifest["deltas"]) == 10
    before = [index.search(q, m, 10) for q in sysu_golden["query_feat"][::60] for m in ("aim", "sim", "krr")]
    compacted = compact(tmp_path, index)
    assert compacted is not None and compacted.manifest["deltas"] == [] and compacted.count == 1040
    after = [compacted.search(q, m, 10) for q in sysu_golden["query_feat"][::60] for m in ("aim", "sim", "krr")]
    assert [[h.index for h in hits] for hits in before] == [[h.index for h in hits] for hits in after]
    del index
    collect_garbage(tmp_path)
    assert list((tmp_path / "deltas").iterdir()) == []  # folded into the base, no longer referenced
    reopened = GalleryIndex.open(tmp_path, first_stage="scan")
    assert [h.index for h in reopened.search(sysu_golden["query_feat"][0], "sim", 10)] == [h.index for h in after[1]]


def test_enrolling_the_same_content_twice_adds_it_once(cli_index: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "index"
    shutil.copytree(cli_index["index"], index)
    capsys.readouterr()
    assert main(["index", "add", str(index), "--images", str(cli_index["root"] / "first")]) == 0
    assert "nothing to add" in capsys.readouterr().out
    assert GalleryIndex.open(index).count == 12
    extra = tmp_path / "extra"
    write_gallery(extra, range(40, 42), 1)
    shutil.copy(extra / "0040_c1_00.jpg", extra / "copy_of_40.jpg")
    assert main(["index", "add", str(index), "--images", str(extra)]) == 0
    assert GalleryIndex.open(index).count == 14
    again, ids = add_to_index(index, np.ones((2, 512)), _image_items(range(40, 41)) * 2)
    assert again.count == 14 and ids[0] == ids[1] < 14


def test_hidden_files_and_folders_are_skipped(cli_index: dict[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_gallery(images, range(1, 3), 2)
    (images / "._0001_c1_00.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    write_gallery(images / ".thumbs", range(7, 8), 1)
    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(cli_index["onnx"]), "--images", str(images), "--out", str(out)]) == 0
    index = GalleryIndex.open(out)
    assert index.count == 4 and not any(index.item(i).name.startswith(".") for i in range(4))


def test_ids_outside_int64_are_one_line_errors(cli_index: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    image = cli_index["root"] / "first" / "0001_c1_00.jpg"
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,person_id,camera\n{image},{2**63},1\n")
    capsys.readouterr()
    assert main(["index", "build", "--model", str(cli_index["onnx"]), "--images", str(manifest),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "64-bit" in err and "Traceback" not in err
    with pytest.raises(InputError, match="64-bit"):
        NewImage(GalleryItem(name="x", cam=-(2**63) - 1))


@pytest.mark.parametrize(("feats", "match"), [
    (np.zeros((3, 4)), "all zero"), (np.ones((3, 0)), "d > 0"), (np.full((3, 4), 1e39), "beyond float32"),
    (np.full((3, 4), np.nan), "non-finite"),
])
def test_meaningless_features_are_refused(tmp_path: Path, feats: np.ndarray, match: str) -> None:
    with pytest.raises(InputError, match=match):
        build_index(tmp_path, feats, _items(3))


def _damage(root: Path, what: str) -> Path:
    index = GalleryIndex.open(root, first_stage="scan")
    manifest = index.manifest
    del index
    target = {"base": root / manifest["base"], "segment": root / manifest["segments"][0]["file"],
              "delta": root / manifest["deltas"][0]["file"], "metadata": root / manifest["metadata"],
              "manifest": root / "versions" / f"{manifest['version']}.json"}[what]
    data = target.read_bytes()
    if what == "metadata":  # SQLite: a damaged header (its pages may also live in the WAL file)
        target.write_bytes(b"\x00" * 100 + data[100:])
    else:
        target.write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.parametrize("what", ["base", "segment", "delta", "metadata", "manifest"])
def test_a_damaged_file_is_named_by_verify_and_gives_no_traceback(cli_index: dict[str, Path], tmp_path: Path, what: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "index"
    small = [f"--param={m}.{k}={v}" for m, values in SMALL_GALLERY_PARAMS.items() for k, v in values.items()]
    assert main(["index", "build", "--model", str(cli_index["onnx"]), "--images", str(cli_index["root"] / "first"),
                 "--out", str(index), *small]) == 0
    add_to_index(index, np.ones((1, 512)), _image_items(range(50, 51)))  # a delta: sizes fit 12 and 13 items
    assert main(["index", "verify", str(index)]) == 0
    damaged = _damage(index, what)
    capsys.readouterr()
    query = str(cli_index["root"] / "first" / "0002_c1_01.jpg")
    for command in (["index", "verify", str(index)], ["index", "info", str(index)],
                    ["search", str(index), "--image", query]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert damaged.name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_old_format_and_missing_index_are_named(tmp_path: Path) -> None:
    (tmp_path / "CURRENT").write_text("v000001\n")
    with pytest.raises(InputError, match="format 1"):
        GalleryIndex.open(tmp_path)
    with pytest.raises(InputError, match="no version v000009"):
        build_index(tmp_path / "new", np.ones((2, 4)) + np.eye(2, 4), _items(2))
        restore_version(tmp_path / "new", "v000009")
    manifest = json.loads(next((tmp_path / "new" / "versions").glob("*.json")).read_text())
    assert manifest["format"] == 2


def test_a_lost_thumbnail_is_made_again(tmp_path: Path) -> None:
    build_index(tmp_path, np.random.default_rng(3).standard_normal((4, 8)), _image_items(range(1, 5)))
    index = GalleryIndex.open(tmp_path, first_stage="scan")
    thumb = index.image_path(index.item(2), thumbnail=True)
    data = thumb.read_bytes()
    thumb.unlink()  # thumbnails are not synced to disk: a power failure may take one
    assert verify_index(tmp_path)["count"] == 4
    again = index.image_path(index.item(2), thumbnail=True)
    assert again == thumb and thumb.read_bytes() == data
