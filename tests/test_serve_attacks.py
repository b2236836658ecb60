"""The service under attack, in its own process: its resident memory and the bytes of its
temporary files are sampled while oversized, unauthenticated and elongated uploads run."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from test_serve_support import (
    ResourceSampler,
    ServerProcess,
    build_image_index,
    multipart_stream,
    person_image,
    send_raw,
)

TOKEN = "attack-test-token-5b1f0c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MULTIPART = {"Content-Type": "multipart/form-data; boundary=vireidboundary"}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image_index(tmp_path_factory.mktemp("attack"))


@pytest.fixture(scope="module")
def spool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def server(index_dir: Path, spool: Path):
    with ServerProcess(index_dir, env={"VIREID_SERVE_TOKEN": TOKEN, "TMPDIR": str(spool)}) as running:
        yield running


def test_unauthenticated_uploads_are_refused_before_their_body_is_read(server: ServerProcess, spool: Path) -> None:
    size = 200 * 2**20
    with ResourceSampler(server, spool) as declared:
        status = send_raw(server.url, "POST", "/gallery", {**MULTIPART, "Content-Length": str(size + 200)},
                          multipart_stream("images", "big.jpg", size), chunked=False)
    assert status == 401
    with ResourceSampler(server, spool) as streamed:
        status = send_raw(server.url, "POST", "/gallery", MULTIPART, multipart_stream("images", "big.jpg", size))
    assert status == 401
    for sample in (declared, streamed):
        assert sample.peak_disk_mib < 1 and sample.peak_rss_mib < 32, vars(sample)


def test_a_chunked_upload_is_cut_at_the_limit_while_it_streams(server: ServerProcess, spool: Path) -> None:
    with ResourceSampler(server, spool) as sample:
        status = send_raw(server.url, "POST", "/search", {**MULTIPART, **AUTH},
                          multipart_stream("image", "big.jpg", 100 * 2**20))
    assert status == 413
    assert sample.peak_disk_mib < 9 and sample.peak_rss_mib < 48, vars(sample)  # the 8 MiB limit, not 100 MiB


def test_a_form_holds_only_the_parts_its_endpoint_takes(server: ServerProcess) -> None:
    image = person_image(1, 1)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        two = client.post("/search", files=[("image", ("a.jpg", image)), ("image", ("b.jpg", image))])
        fields = client.post("/search", files={"image": ("a.jpg", image)}, data={f"f{i}": "x" for i in range(20)})
        many = client.post("/gallery", files=[("images", (f"{i}.jpg", image)) for i in range(65)])
    assert [two.status_code, fields.status_code, many.status_code] == [400, 400, 400]


def test_an_elongated_png_is_refused_from_its_header(server: ServerProcess, spool: Path) -> None:
    pngs = []
    for height in (39_000_000, 4_000_000):  # over the pixel limit; under it but 1:4,000,000
        out = io.BytesIO()
        Image.new("L", (1, height)).save(out, format="PNG", compress_level=9)
        assert len(out.getvalue()) < 128 * 1024  # tiny on the wire, millions of pixels decoded
        pngs.append(out.getvalue())
    with ResourceSampler(server, spool) as sample, httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        responses = [c.post("/search", files={"image": ("thin.png", png, "image/png")}) for png in pngs]
    assert [r.status_code for r in responses] == [413, 413]
    assert "exceeds the limit of 16000000 pixels" in responses[0].json()["detail"]
    assert "more elongated than 16:1" in responses[1].json()["detail"]
    assert sample.peak_rss_mib < 64, vars(sample)


def test_excess_decodes_get_503_with_retry_after_not_more_memory(index_dir: Path, spool: Path) -> None:
    out = io.BytesIO()
    Image.new("RGB", (4000, 4000), (120, 60, 30)).save(out, format="PNG")  # 16 Mpixel: allowed, ~100 MiB to decode
    image = out.getvalue()
    with ServerProcess(index_dir, "--decode-slots", "1", "--queue-limit", "1", "--queue-timeout", "0.2",
                       env={"VIREID_SERVE_TOKEN": TOKEN, "TMPDIR": str(spool)}) as server, \
            ResourceSampler(server, spool) as sample, httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: c.post("/search", files={"image": ("big.png", image)}), range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
    assert sample.peak_rss_mib < 400, vars(sample)  # one decode at a time (six at once took ~6x)
