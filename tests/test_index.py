"""Gallery index: single-query re-ranking equals the references, incremental adds equal rebuilds,
and a writer killed with SIGKILL never leaves a half-written index."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from test_serve_support import make_checkpoint, person_image, write_gallery
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
    store_file,
)
from vireid.serve.quantized import QuantizedGallery
from vireid.serve.rerank import (
    RerankParams,
    aim_on_candidates,
    build_structures,
    extend_graph,
    gallery_graph,
    l2_normalize_rows,
    rerank_distance,
    top_k,
)

REPO = Path(__file__).resolve().parents[1]


def _structures(gallery: np.ndarray, params: RerankParams):
    return build_structures(gallery, gallery_graph(gallery, params.graph_k(), "exact"), params)


@pytest.mark.parametrize(("method", "k1", "k2", "key"), [
    ("plain", 20, 6, "dist_plain"), ("aim", 4, 1, "dist_aim_4_1"), ("aim", 20, 6, "dist_aim_20_6"),
    ("mnnr", 20, 6, "dist_mnnr"), ("sim", 20, 6, "dist_sim"),
])
def test_single_query_rerank_reproduces_reference_rows(sysu_golden, method: str, k1: int, k2: int, key: str) -> None:
    queries = l2_normalize_rows(sysu_golden["query_feat"])
    gallery = l2_normalize_rows(sysu_golden["gallery_feat"])
    params = RerankParams(aim_k1=k1, aim_k2=k2)
    structures = _structures(gallery, params)
    got = np.stack([rerank_distance(queries[i], gallery, structures, method, params) for i in sysu_golden["rows"]])
    np.testing.assert_allclose(got, sysu_golden[key], atol=2e-5)


def test_single_query_krr_ranks_better_than_plain(sysu_golden) -> None:
    queries = l2_normalize_rows(sysu_golden["query_feat"])
    gallery = l2_normalize_rows(sysu_golden["gallery_feat"])
    params = RerankParams()
    structures = _structures(gallery, params)

    def rank1(method: str) -> float:
        best = [np.argmin(rerank_distance(q, gallery, structures, method, params)) for q in queries]
        return float(np.mean(sysu_golden["gallery_id"][best] == sysu_golden["query_id"]))

    assert rank1("krr") > rank1("plain") + 0.1


def test_extended_graph_equals_exact_graph() -> None:
    feats = l2_normalize_rows(np.random.default_rng(0).standard_normal((300, 16)))
    full = gallery_graph(feats, 12, "exact")
    grown = extend_graph(gallery_graph(feats[:250], 12, "exact"), feats, 50, 12)
    np.testing.assert_array_equal(grown.index, full.index)
    np.testing.assert_allclose(grown.sim, full.sim, atol=1e-6)


def _items(n: int, start: int = 0) -> list[NewImage]:
    return [NewImage(GalleryItem(name=f"item{start + i}", pid=(start + i) // 3, cam=1)) for i in range(n)]


def test_add_gives_the_same_results_as_a_full_build(tmp_path: Path, sysu_golden) -> None:
    gallery = sysu_golden["gallery_feat"]
    settings = IndexSettings(knn="exact")
    build_index(tmp_path / "grown", gallery[:900], _items(900), settings=settings)
    version, ids = add_to_index(tmp_path / "grown", gallery[900:1000], _items(100, 900))
    assert version == "v000002" and ids == range(900, 1000)
    add_to_index(tmp_path / "grown", gallery[1000:], _items(len(gallery) - 1000, 1000))
    build_index(tmp_path / "full", gallery, _items(len(gallery)), settings=settings)
    grown, full = GalleryIndex.open(tmp_path / "grown"), GalleryIndex.open(tmp_path / "full")
    grown.verify()
    assert grown.version == "v000003" and grown.count == full.count == len(gallery)
    for query in sysu_golden["query_feat"][::50]:
        for method in ("plain", "aim", "sim", "krr"):
            a, b = grown.search(query, method, 10), full.search(query, method, 10)
            assert [h.index for h in a] == [h.index for h in b]
            np.testing.assert_allclose([h.distance for h in a], [h.distance for h in b], atol=1e-5)
    assert grown.item(1050) == GalleryItem(name="item1050", pid=350, cam=1)
    # only the live and the previous version are kept; every kept segment is referenced
    assert sorted(p.name for p in (tmp_path / "grown" / "versions").iterdir()) == ["v000002", "v000003"]
    assert len(list((tmp_path / "grown" / "segments").iterdir())) == 3


def test_float16_scan_keeps_the_ranking(tmp_path: Path, sysu_golden) -> None:
    build_index(tmp_path, sysu_golden["gallery_feat"], _items(len(sysu_golden["gallery_feat"])))
    exact = GalleryIndex.open(tmp_path, first_stage="scan")
    half = GalleryIndex.open(tmp_path, scan_dtype="float16", first_stage="scan")
    query = sysu_golden["query_feat"][0]
    assert [h.index for h in exact.search(query, "aim", 5)] == [h.index for h in half.search(query, "aim", 5)]


def test_candidate_search_equals_full_scan_when_every_list_is_probed(tmp_path: Path, sysu_golden) -> None:
    build_index(tmp_path, sysu_golden["gallery_feat"], _items(len(sysu_golden["gallery_feat"])))
    exact = GalleryIndex.open(tmp_path, first_stage="scan")
    approximate = GalleryIndex.open(tmp_path, first_stage="ivf", candidates=60, nprobe=1024)
    for query in sysu_golden["query_feat"][::20]:
        for method in ("plain", "aim"):
            a, b = exact.search(query, method, 10), approximate.search(query, method, 10)
            assert [h.index for h in a] == [h.index for h in b]
            np.testing.assert_allclose([h.distance for h in a], [h.distance for h in b], atol=1e-5)


def test_int8_first_stage_equals_full_scan(tmp_path: Path, sysu_golden) -> None:
    gallery = sysu_golden["gallery_feat"]
    build_index(tmp_path, gallery, _items(len(gallery)))
    exact = GalleryIndex.open(tmp_path, first_stage="scan")
    fast = GalleryIndex.open(tmp_path, first_stage="int8", candidates=1)  # keeps 2·max(topk, k1) = 40 items
    assert fast.first_stage_candidates(l2_normalize_rows(gallery[:1])[0], 10)[0].shape == (40,)
    for query in sysu_golden["query_feat"][::10]:
        for method in ("plain", "aim", "sim"):
            a, b = exact.search(query, method, 10), fast.search(query, method, 10)
            assert [h.index for h in a] == [h.index for h in b]
            np.testing.assert_allclose([h.distance for h in a], [h.distance for h in b], atol=1e-5)


def test_aim_on_the_true_nearest_candidates_equals_the_full_scan(sysu_golden) -> None:
    gallery = l2_normalize_rows(sysu_golden["gallery_feat"])
    params = RerankParams()
    structures = _structures(gallery, params)
    for query in l2_normalize_rows(sysu_golden["query_feat"][::25]):
        full = rerank_distance(query, gallery, structures, "aim", params)
        sim = gallery @ query
        cand = np.argsort(-sim)[:40]
        for keep in (None, 10):
            rows, dist = aim_on_candidates(query, gallery, structures, params.aim_k1, cand, sim[cand], keep=keep)
            best = np.argsort(dist, kind="stable")[:10]
            np.testing.assert_array_equal(rows[best], top_k(full, 10))
            np.testing.assert_allclose(dist[best], full[rows[best]], atol=1e-5)


def test_quantized_gallery_finds_the_nearest_items() -> None:
    rng = np.random.default_rng(3)
    gallery = l2_normalize_rows(rng.standard_normal((2000, 96)) * np.linspace(0.2, 3.0, 96))  # uneven ranges
    quantized = QuantizedGallery(gallery)
    assert quantized.count == 2000
    for query in l2_normalize_rows(rng.standard_normal((20, 96))):
        exact_top = set(np.argsort(-(gallery @ query))[:10])
        assert exact_top <= set(quantized.candidates(query, 20))
    assert len(quantized.candidates(query, 5000)) == 2000


def test_quantized_scan_restores_the_callers_thread_setting() -> None:
    import faiss

    quantized = QuantizedGallery(l2_normalize_rows(np.random.default_rng(4).standard_normal((50, 8))))
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        quantized.candidates(np.ones(8, np.float32) / np.sqrt(8), 5)
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a vireid index"):
        GalleryIndex.open(tmp_path)
    with pytest.raises(InputError, match="shape"):
        build_index(tmp_path, np.ones((3, 4)), _items(2))
    build_index(tmp_path, np.random.default_rng(1).standard_normal((30, 8)), _items(30))
    with pytest.raises(InputError, match="d=9"):
        add_to_index(tmp_path, np.ones((1, 9)), _items(1))
    with pytest.raises(InputError, match="unknown re-ranking"):
        GalleryIndex.open(tmp_path).search(np.ones(8), "best", 3)
    with pytest.raises(InputError, match="first stage"):
        GalleryIndex.open(tmp_path, first_stage="pq")
    with pytest.raises(InputError, match="candidates"):
        GalleryIndex.open(tmp_path, candidates=0)


@pytest.fixture(scope="module")
def image_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    onnx = folder / "model.onnx"
    assert main(["export", "--checkpoint", str(make_checkpoint(folder)), "--out", str(onnx)]) == 0
    write_gallery(folder / "gallery", range(1, 5), 3)
    write_gallery(folder / "more", range(5, 17), 4)
    (folder / "query.jpg").write_bytes(person_image(2, 9))
    assert main(["index", "build", "--model", str(onnx), "--images", str(folder / "gallery"), "--out", str(folder / "index")]) == 0
    return {"root": folder, "onnx": onnx, "index": folder / "index", "more": folder / "more"}


def test_cli_build_search_and_add(image_index: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "index"
    shutil.copytree(image_index["index"], index)
    capsys.readouterr()
    assert main(["search", str(index), "--image", str(image_index["root"] / "query.jpg"), "--topk", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("0002_c1_" in line for line in lines[1:])
    manifest = tmp_path / "more.csv"
    manifest.write_text("path,person_id,camera,time\n" + "".join(
        f"{p},{5 + i // 4},3,2026-01-0{1 + i % 4}T00:00:00Z\n" for i, p in enumerate(sorted(image_index["more"].iterdir()))))
    assert main(["index", "add", str(index), "--images", str(manifest)]) == 0
    loaded = GalleryIndex.open(index)
    loaded.verify()
    assert loaded.count == 12 + 48
    assert loaded.item(12).pid == 5 and loaded.item(12).cam == 3 and loaded.item(12).time == "2026-01-01T00:00:00Z"
    assert loaded.image_path(loaded.item(12), thumbnail=True).is_file()
    assert main(["index", "add", str(index), "--images", str(tmp_path / "nothing")]) == 2


def _start(args: list[str], marker: str) -> tuple[subprocess.Popen[str], str]:
    """``vireid ARGS`` in a subprocess, paired with the progress line to kill it at."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "vireid", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env), marker


def _kill_at(proc: subprocess.Popen[str], marker: str) -> bool:
    """SIGKILL ``proc`` as soon as it reports ``marker``; False when it finished first."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
    proc.wait()
    return False


def test_sigkill_during_build_or_add_leaves_the_previous_index(image_index: dict[str, Path], tmp_path: Path) -> None:
    copies = {name: tmp_path / name for name in ("early", "late")}
    for path in copies.values():
        shutil.copytree(image_index["index"], path)
    more = str(image_index["more"])
    runs = {
        "early": _start(["index", "add", str(copies["early"]), "--images", more], "encoded 16/48"),
        "late": _start(["index", "add", str(copies["late"]), "--images", more], "writing version"),
        "fresh": _start(["index", "build", "--model", str(image_index["onnx"]), "--images", more,
                             "--out", str(tmp_path / "fresh")], "encoded 16/48"),
    }
    with ThreadPoolExecutor(len(runs)) as pool:  # watch all three at once
        killed = dict(zip(runs, pool.map(lambda run: _kill_at(*run), runs.values())))
    assert killed["early"] and killed["fresh"]
    early = GalleryIndex.open(copies["early"])
    early.verify()
    assert early.count == 12 and early.version == "v000001"
    late = GalleryIndex.open(copies["late"])  # killed while writing: the old version, or the finished new one
    late.verify()
    assert late.count in (12, 60)
    # images the killed writer had copied in are removed; every referenced one stays
    if late.count == 12:
        assert len(_stored(copies["late"])["images"]) == 12 + 48  # the 48 new ones were copied before the kill
    assert main(["index", "gc", str(copies["late"])]) == 0
    assert _stored(copies["late"]) == {"images": _referenced(copies["late"]), "thumbs": _thumbs(_referenced(copies["late"]))}
    assert main(["index", "gc", str(tmp_path / "fresh")]) == 2
    with pytest.raises(InputError, match="not a vireid index"):
        GalleryIndex.open(tmp_path / "fresh")
    # the next writer clears the leftovers and succeeds
    assert main(["index", "add", str(copies["early"]), "--images", more]) == 0
    grown = GalleryIndex.open(copies["early"])
    grown.verify()
    assert grown.count == 60 and not list((copies["early"] / "versions").glob(".tmp-*"))


def _stored(root: Path) -> dict[str, set[str]]:
    return {sub: {p.name for p in (root / sub).iterdir()} for sub in ("images", "thumbs")}


def _referenced(root: Path) -> set[str]:
    index = GalleryIndex.open(root, first_stage="scan")
    return {item.image for item in index.items(range(index.count)) if item.image is not None}


def _thumbs(images: set[str]) -> set[str]:
    return {name.split(".")[0] + ".jpg" for name in images}


def _image_items(pids: range, variant: int = 0) -> list[NewImage]:
    return [NewImage(GalleryItem(name=f"{pid}.jpg", pid=pid), person_image(pid, variant)) for pid in pids]


def _plant_orphans(root: Path) -> str:
    """What a writer killed after copying its images leaves: an image, its thumbnail and a
    half-written temporary file; returns the orphan image's name."""
    orphan = store_file(root, "images", person_image(99, 0), "jpg")
    (root / "thumbs" / (orphan.split(".")[0] + ".jpg")).write_bytes(b"thumbnail")
    (root / "images" / f".{'c' * 64}.png.x7_k2q.png.tmp").write_bytes(b"partial")
    return orphan


def test_gc_removes_orphaned_images_and_keeps_referenced_ones(tmp_path: Path) -> None:
    root = tmp_path / "index"
    build_index(root, np.random.default_rng(0).standard_normal((6, 8)), _image_items(range(1, 7)))
    before = _stored(root)
    assert before["images"] == _referenced(root) and len(before["images"]) == 6
    _plant_orphans(root)
    (root / "images" / "notes.txt").write_text("not ours")
    outside = tmp_path / "outside" / f"{'b' * 64}.jpg"
    outside.parent.mkdir()
    outside.write_bytes(person_image(5, 5))
    (root / "images" / outside.name).symlink_to(outside)  # unlinked, never followed
    assert collect_garbage(root) == 4
    assert _stored(root) == {"images": before["images"] | {"notes.txt"}, "thumbs": before["thumbs"]}
    assert outside.is_file()
    index = GalleryIndex.open(root, first_stage="scan")
    assert all(index.image_path(index.item(i), thumbnail=t).is_file() for i in range(6) for t in (False, True))


def test_next_add_removes_orphaned_images(tmp_path: Path) -> None:
    root = tmp_path / "index"
    feats = np.random.default_rng(1).standard_normal((9, 8))
    build_index(root, feats[:6], _image_items(range(1, 7)))
    orphan = _plant_orphans(root)
    add_to_index(root, feats[6:], _image_items(range(7, 10)))
    images = _referenced(root)
    assert len(images) == 9 and orphan not in images
    assert _stored(root) == {"images": images, "thumbs": _thumbs(images)}


def test_gc_deletes_nothing_when_a_kept_version_is_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "index"
    feats = np.random.default_rng(2).standard_normal((9, 8))
    build_index(root, feats[:6], _image_items(range(1, 7)))
    add_to_index(root, feats[6:], _image_items(range(7, 10)))
    (root / "versions" / "v000001" / "gallery.sqlite").write_bytes(b"not a database")
    orphan = _plant_orphans(root)
    assert collect_garbage(root) == 0
    assert orphan in _stored(root)["images"]
