"""The service's privacy and hardening: reads behind the token, the Host header, no CDN, security
headers, token length, the bind warning, clean error texts, bad ids, a damaged index, and searches
that keep their version while enrolments (in process and from another process) commit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_serve_support import RunningServer, build_image_index, person_image
from vireid.cli import main
from vireid.errors import InputError
from vireid.serve.app import MIN_TOKEN_LENGTH, ServiceConfig, bind_warning, read_token

TOKEN = "hardening-token-19c4a7"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image_index(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def server(index_dir: Path):
    with RunningServer(index_dir, ServiceConfig(token=TOKEN)) as running:
        yield running


def _query(client: httpx.Client, **fields: str) -> httpx.Response:
    return client.post("/search", files={"image": ("q.jpg", person_image(3, 9), "image/jpeg")}, data=fields)


def test_reads_need_the_token_when_one_is_set(server: RunningServer, index_dir: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as anonymous, \
            httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as member:
        for path in ("/gallery/0", "/gallery/0/image", "/gallery/0/thumbnail", "/gallery/1/image"):
            assert anonymous.get(path).status_code == 401, path
            assert member.get(path).status_code == 200, path
        assert _query(anonymous).status_code == 401
        assert _query(member).status_code == 200
        assert member.get("/gallery/0/image").headers["cache-control"].startswith("private")
        assert anonymous.get("/health").json()["auth"] == {"enrol": True, "reads": True}
    with RunningServer(index_dir, ServiceConfig(token=TOKEN, public_reads=True)) as public, \
            httpx.Client(base_url=public.url, timeout=60) as anonymous:
        assert anonymous.get("/gallery/0/image").status_code == 200 and _query(anonymous).status_code == 200
        assert anonymous.post("/gallery", files={"images": ("x.jpg", person_image(9, 9))}).status_code == 401


def test_the_host_header_must_name_an_allowed_host(server: RunningServer) -> None:
    port = server.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.2:{port}", ""):
            response = client.get("/health", headers={"Host": host})
            assert response.status_code == 400 and "Host" in response.json()["detail"], host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host


def test_no_cdn_and_security_headers_everywhere(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").status_code == 200
        responses = [client.get(p) for p in ("/", "/health", "/static/app.js", "/gallery/0", "/nothing")]
        responses.append(client.post("/search", files={"image": ("x.jpg", b"not an image")}, headers=AUTH))
        for response in responses:
            assert response.headers["x-content-type-options"] == "nosniff", response.url
            assert "default-src 'self'" in response.headers["content-security-policy"], response.url
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"], response.url
        page = client.get("/").text + client.get("/static/app.js").text
        assert "cdn" not in page.lower() and "http://" not in page and "https://" not in page


def test_tokens_are_long_enough(index_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a server started with a one-character token")

    monkeypatch.setattr(uvicorn, "run", refuse)
    short = tmp_path / "token"
    short.write_text("x\n")
    monkeypatch.delenv("VIREID_SERVE_TOKEN", raising=False)
    assert main(["serve", str(index_dir), "--token-file", str(short)]) == 2
    assert f"at least {MIN_TOKEN_LENGTH}" in capsys.readouterr().err
    monkeypatch.setenv("VIREID_SERVE_TOKEN", "a" * (MIN_TOKEN_LENGTH - 1))
    with pytest.raises(InputError, match="at least"):
        read_token()
    with pytest.raises(InputError, match="at least"):
        ServiceConfig(token="tiny").validate()


def test_a_non_loopback_address_gives_a_warning(index_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert bind_warning("127.0.0.1") is None and bind_warning("::1") is None and bind_warning("localhost") is None
    assert "reachable from the network" in (bind_warning("0.0.0.0") or "")
    started: dict[str, object] = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(kwargs))  # nothing is bound
    monkeypatch.delenv("VIREID_SERVE_TOKEN", raising=False)
    assert main(["serve", str(index_dir), "--host", "0.0.0.0", "--allowed-host", "search.example"]) == 0
    assert "warning" in capsys.readouterr().err and started["host"] == "0.0.0.0"
    assert main(["serve", str(index_dir)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_error_texts_hold_no_heap_addresses_and_ids_fit_int64(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        response = client.post("/search", files={"image": ("x.jpg", b"hello, not an image")})
        assert response.status_code == 400 and "0x" not in response.text and "object at" not in response.text
        for field in ("pid", "cam"):
            for value in (str(2**63), str(-(2**63) - 1)):
                enrol = client.post("/gallery", files={"images": ("x.jpg", person_image(60, 1))}, data={field: value})
                assert enrol.status_code == 400 and "64-bit" in enrol.json()["detail"], (field, value)


def test_slow_searches_finish_on_their_version_while_enrolments_commit(index_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Searches that stall between ranking and reading metadata, while three enrolments commit
    through the service and one `vireid index add` commits from another process: no errors."""
    from vireid.serve.index import GalleryIndex

    slow = threading.Event()
    original = GalleryIndex.items

    def stalled(self, indices):  # type: ignore[no-untyped-def]
        if slow.is_set() and threading.current_thread().name != "enroller":
            time.sleep(1.0)
        return original(self, indices)

    monkeypatch.setattr(GalleryIndex, "items", stalled)
    more = tmp_path / "more"
    more.mkdir()
    for i in range(3):
        (more / f"cli_{i}.jpg").write_bytes(person_image(70 + i, 0))
    errors: list[str] = []
    with RunningServer(index_dir, ServiceConfig(token=TOKEN)) as running:
        def search(n: int) -> None:
            with httpx.Client(base_url=running.url, timeout=120, headers=AUTH) as client:
                for _ in range(2):
                    response = _query(client, rerank=("aim", "sim", "krr", "plain")[n % 4], topk="5")
                    if response.status_code != 200 or len(response.json()["results"]) != 5:
                        errors.append(f"search {response.status_code}: {response.text[:200]}")

        def enrol() -> None:
            with httpx.Client(base_url=running.url, timeout=120, headers=AUTH) as client:
                for i in range(3):
                    response = client.post("/gallery", files={"images": (f"e{i}.jpg", person_image(80 + i, 0))})
                    if response.status_code != 201:
                        errors.append(f"enrol {response.status_code}: {response.text[:200]}")
                env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
                add = subprocess.run([sys.executable, "-m", "vireid", "index", "add", str(index_dir), "--images",
                                      str(more)], env=env, capture_output=True, text=True, timeout=300)
                if add.returncode != 0:
                    errors.append(f"index add: {add.stderr[-300:]}")

        slow.set()
        threads = [threading.Thread(target=search, args=(n,)) for n in range(6)]
        threads.append(threading.Thread(target=enrol, name="enroller"))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        slow.clear()
        with httpx.Client(base_url=running.url, timeout=60, headers=AUTH) as client:
            count = client.get("/health").json()["count"]
    assert errors == []
    assert count == GalleryIndex.open(index_dir).count and count >= 24 + 6


def test_a_damaged_index_gives_503_not_500(index_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    with RunningServer(copy, ServiceConfig(token=TOKEN)) as running, \
            httpx.Client(base_url=running.url, timeout=60, headers=AUTH) as client:
        metadata = running.server.config.app.state.service.index.metadata_path
        with open(metadata, "r+b") as fh:  # the SQLite header, in place
            fh.write(b"\x00" * 100)
        responses = [client.get("/gallery/0"), _query(client), client.get("/gallery/1/thumbnail")]
        assert [r.status_code for r in responses] == [503, 503, 503]
        assert all("unavailable" in r.json()["detail"] and "Traceback" not in r.text for r in responses)
