"""The search service over HTTP: results, enrolment with a token, bad input, load, restart."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from test_serve_support import RunningServer, build_image_index, person_image
from vireid.serve.app import ServiceConfig

TOKEN = "test-token-7f3a-5c2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(index_dir: Path):
    with RunningServer(index_dir, ServiceConfig(token=TOKEN, max_upload_bytes=LIMIT)) as running:
        yield running


@pytest.fixture()
def client(server: RunningServer):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def _query(client: httpx.Client, data: bytes, name: str = "q.jpg", **fields: str) -> httpx.Response:
    return client.post("/search", files={"image": (name, data, "image/jpeg")}, data=fields)


def test_health_openapi_and_page(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["count"] == 24 and health["dim"] == 512
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/gallery", "/gallery/{item_id}", "/gallery/{item_id}/thumbnail", "/health"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "search-form" in page.text
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("rerank", ["plain", "aim", "sgr", "sim", "mnnr", "krr"])
def test_search_ranks_the_same_person_first(client: httpx.Client, rerank: str) -> None:
    response = _query(client, person_image(5, 11), modality="infrared", topk="4", rerank=rerank)
    assert response.status_code == 200
    body = response.json()
    assert body["rerank"] == rerank and len(body["results"]) == 4
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4]
    distances = [r["distance"] for r in body["results"]]
    assert distances == sorted(distances)
    assert all(r["name"].startswith("0005_") for r in body["results"][:3])
    thumb = client.get(body["results"][0]["thumbnail_url"])
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"


@pytest.mark.parametrize("rerank", ["plain", "aim", "sgr", "sim", "mnnr", "krr"])
def test_every_method_serves_a_non_negative_distance_smaller_is_closer(client: httpx.Client, index_dir: Path,
                                                                       rerank: str) -> None:
    """One convention for every re-ranking: distance >= 0, non-decreasing along the list; plain is
    ``1 − cos`` and AIM ``2 + (−affinity − cos)`` (SAAI Eq. 10), the other methods as computed."""
    from vireid.retrieval.single import query_distance
    from vireid.serve.encoder import decode_image, encode_images, load_encoder
    from vireid.serve.index import GalleryIndex
    from vireid.data.records import Modality

    data = person_image(3, 17)
    body = _query(client, data, modality="visible", topk="8", rerank=rerank).json()
    distances = [r["distance"] for r in body["results"]]
    assert distances == sorted(distances) and min(distances) >= -1e-6
    index = GalleryIndex.open(index_dir, first_stage="scan")
    encoder = load_encoder(index.model_file)
    query = encode_images(encoder, [decode_image(data, "q.jpg")], Modality.VISIBLE)[0].astype(np.float64)
    cosine = index.feats.astype(np.float64) @ (query / np.linalg.norm(query))
    ids = [r["id"] for r in body["results"]]
    if rerank == "plain":
        expected = 1.0 - cosine[ids]
    else:
        expected = query_distance(rerank, cosine, index.state)[ids] + (2.0 if rerank == "aim" else 0.0)
    np.testing.assert_allclose(distances, expected, atol=1e-4)


@pytest.mark.parametrize("rerank", ["aim", "sim"])
def test_cli_search_json_is_the_http_json(client: httpx.Client, index_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], rerank: str) -> None:
    import json

    from vireid.cli import main

    query = tmp_path / "query.jpg"
    query.write_bytes(person_image(6, 21))
    http = _query(client, query.read_bytes(), modality="infrared", topk="5", rerank=rerank).json()
    capsys.readouterr()
    assert main(["search", str(index_dir), "--image", str(query), "--modality", "infrared", "--rerank", rerank,
                 "--topk", "5", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert list(cli) == list(http) and list(cli["timing_ms"]) == list(http["timing_ms"])
    assert [list(r) for r in cli["results"]] == [list(r) for r in http["results"]]
    for key in ("version", "count", "modality", "rerank"):
        assert cli[key] == http[key]
    for a, b in zip(cli["results"], http["results"], strict=True):
        assert a["distance"] == pytest.approx(b["distance"], abs=1e-5)
        assert {k: v for k, v in a.items() if k != "distance"} == {k: v for k, v in b.items() if k != "distance"}


@pytest.mark.parametrize(("path", "expected"), [
    ("0002_c1s1_000451_03.jpg", (2, 1)),          # Market-1501
    ("0005_c2_f0046985.jpg", (5, 2)),             # DukeMTMC-reID
    ("bounding_box_test/1501_c6s4_001877_01.jpg", (1501, 6)),
    ("0000_c3s2_000001_00.jpg", (None, 3)),       # Market distractor: no person
    ("-1_c5s3_065462_04.jpg", (None, 5)),         # Market junk: no person
    ("cam3/0001/0004.jpg", (1, 3)),               # SYSU-MM01
    ("sysu/cam6/0333/0010.jpg", (333, 6)),
    ("cam3/0001/0001_c3s1_000001_00.jpg", (1, 3)),  # both layouts, agreeing
    ("cam3/0001/0002_c3s1_000001_00.jpg", (None, None)),  # both layouts, disagreeing: unknown
    ("cam3/0004.jpg", (None, None)),              # no person folder
    ("0001/cam3/0004.jpg", (None, None)),
    ("person_0001_c1.jpg", (None, None)),
    ("12_c1s1_000001_00.jpg", (None, None)),      # not four digits
    ("0001_cam1_0001.jpg", (None, None)),
    ("IMG_0001.jpg", (None, None)),
])
def test_identity_and_camera_from_common_layouts(path: str, expected: tuple[int | None, int | None]) -> None:
    from pathlib import PurePosixPath

    from vireid.serve.sources import identity_from_path

    assert identity_from_path(PurePosixPath(path)) == expected


def test_a_folder_gallery_takes_ids_from_its_layout(tmp_path: Path) -> None:
    from vireid.data.records import Modality
    from vireid.serve.sources import gallery_sources

    files = {"market/0007_c2s1_000101_01.jpg": (7, 2), "sysu/cam5/0012/0003.jpg": (12, 5),
             "phone/IMG_2041.jpg": (None, None)}
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(person_image(1, 1))
    got = {item.name: (item.pid, item.cam) for _, item in gallery_sources(tmp_path, Modality.VISIBLE)}
    assert got == files
    (single,) = gallery_sources(tmp_path / "market/0007_c2s1_000101_01.jpg", Modality.VISIBLE)
    assert (single[1].pid, single[1].cam) == (7, 2)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\nmarket/0007_c2s1_000101_01.jpg\n")
    (row,) = gallery_sources(manifest, Modality.VISIBLE)
    assert (row[1].pid, row[1].cam) == (None, None)  # a manifest's empty columns stay unknown


def test_bad_input_gets_4xx_with_a_message(client: httpx.Client) -> None:
    good = person_image(1, 1)
    icon = io.BytesIO()
    Image.new("RGB", (16, 16)).save(icon, format="ICO")
    cases = {
        "unsupported format": (_query(client, icon.getvalue(), name="x.ico"), 400, "not a readable image"),
        "not an image": (_query(client, b"hello, not an image"), 400, "not a readable image"),
        "truncated": (_query(client, good[: len(good) // 2]), 400, "not a readable image"),
        "empty": (_query(client, b""), 400, "empty"),
        "too big": (_query(client, b"\xff" * (LIMIT + 1)), 413, "exceeds the limit"),
        "modality": (_query(client, good, modality="ultraviolet"), 400, "modality"),
        "rerank": (_query(client, good, rerank="magic"), 400, "rerank"),
        "topk": (_query(client, good, topk="0"), 400, "topk"),
        "topk type": (_query(client, good, topk="many"), 400, "topk"),
        "no file": (client.post("/search", data={"topk": "3"}), 400, "image"),
        "bad id": (client.get("/gallery/abc"), 400, "item_id"),
        "unknown id": (client.get("/gallery/100000"), 404, "not found"),
        "negative id": (client.get("/gallery/-1/image"), 404, "not found"),
    }
    for name, (response, status, text) in cases.items():
        assert response.status_code == status, name
        assert text in response.json()["detail"], name


def test_decompression_bomb_is_refused(client: httpx.Client) -> None:
    out = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(out, format="PNG")  # ~140 KB on the wire, 144 Mpixel decoded
    response = _query(client, out.getvalue(), name="bomb.png")
    assert response.status_code == 413
    assert "pixels" in response.json()["detail"] or "bomb" in response.json()["detail"]


def test_enrolment_requires_the_token(client: httpx.Client) -> None:
    files = {"images": ("x.jpg", person_image(30, 0), "image/jpeg")}
    client.headers.pop("Authorization")
    assert client.post("/gallery", files=files).status_code == 401
    for header in ("Bearer wrong", "Basic " + TOKEN, TOKEN, "Bearer", f"Bearer {TOKEN}x"):
        response = client.post("/gallery", files=files, headers={"Authorization": header})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_client_names_never_become_paths(client: httpx.Client, index_dir: Path) -> None:
    response = client.post("/gallery", files={"images": ("../../../../tmp/evil.jpg", person_image(31, 0), "image/jpeg")},
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 201
    (new_id,) = response.json()["ids"]
    item = client.get(f"/gallery/{new_id}").json()
    assert item["name"] == "evil.jpg"
    assert not Path("/tmp/evil.jpg").exists()
    assert all(p.resolve().is_relative_to(index_dir) for p in index_dir.rglob("*"))
    assert client.get("/static/../index.py").status_code == 404


def test_server_follows_versions_written_by_another_process(client: httpx.Client, index_dir: Path) -> None:
    from vireid.serve.index import GalleryIndex, GalleryItem, NewImage, add_to_index

    before = client.get("/health").json()
    index = GalleryIndex.open(index_dir)
    add_to_index(index_dir, index.feats[:1] + 0.01, [NewImage(GalleryItem(name="from_cli.jpg", pid=99))])
    del index
    after = client.get("/health").json()
    assert after["count"] == before["count"] + 1 and after["version"] != before["version"]
    assert client.get(f"/gallery/{before['count']}").json()["name"] == "from_cli.jpg"


def test_load_then_restart_keeps_every_enrolled_image(server: RunningServer, index_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """16 concurrent clients × 20 requests, every tenth an enrolment (the small version of
    ``benchmarks/serve_load.py``; re-ranking rows fold into shared layers after 4 enrolled rows, as
    they do after 1,024 in a large gallery): no errors; then a fresh server still has every
    enrolled image."""
    from vireid.retrieval import gallery_state

    monkeypatch.setattr(gallery_state, "_RECENT_ROWS", 4)
    clients, per_client = 16, 20
    latencies: dict[str, list[float]] = {"search": [], "enrol": []}
    errors: list[str] = []
    enrolled: dict[int, str] = {}
    queries = [person_image(1 + i % 8, 20 + i) for i in range(16)]
    lock = threading.Lock()

    def worker(w: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
            for i in range(per_client):
                start = time.perf_counter()
                if (w + i) % 10 == 0:
                    name = f"enrolled_{w}_{i}.png"
                    response = c.post("/gallery", files={"images": (name, person_image(100 + w * per_client + i, 0, fmt="PNG"),
                                                                    "image/png")}, data={"pid": str(100 + w), "cam": "2"})
                    ok = response.status_code == 201
                    kind = "enrol"
                else:
                    rerank = ("aim", "sim", "plain", "krr", "mnnr", "sgr")[(w + i) % 6]
                    response = _query(c, queries[(w * per_client + i) % 16], modality="infrared", topk="10",
                                      rerank=rerank)
                    ok = response.status_code == 200 and len(response.json()["results"]) == 10
                    kind = "search"
                elapsed = time.perf_counter() - start
                with lock:
                    latencies[kind].append(elapsed)
                    if not ok:
                        errors.append(f"{kind} {response.status_code}: {response.text[:200]}")
                    elif kind == "enrol":
                        enrolled[response.json()["ids"][0]] = name

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == []
    assert len(latencies["search"]) + len(latencies["enrol"]) == clients * per_client and len(enrolled) == 32
    for kind, values in latencies.items():
        p50, p95 = np.percentile(values, [50, 95]) * 1000
        print(f"\nload: {len(values)} {kind} requests, p50 {p50:.1f} ms, p95 {p95:.1f} ms")

    with RunningServer(index_dir, ServiceConfig(token=TOKEN)) as restarted, \
            httpx.Client(base_url=restarted.url, headers=AUTH) as c:
        health = c.get("/health").json()
        assert health["count"] >= 24 + 32
        for item_id, name in enrolled.items():
            item = c.get(f"/gallery/{item_id}").json()
            assert item["name"] == name and item["cam"] == 2
            assert c.get(item["image_url"]).status_code == 200
        best = _query(c, person_image(100 + 3 * per_client + 7, 0, fmt="PNG"), topk="1", rerank="plain").json()
        assert best["results"][0]["name"] == "enrolled_3_7.png"
