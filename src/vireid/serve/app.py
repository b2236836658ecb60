"""The search service: FastAPI app over a gallery index, with a web page at ``/``.

Endpoints (OpenAPI schema at ``/openapi.json``; no ``/docs`` page, which would load its assets
from a CDN):

* ``POST /search`` — multipart ``image`` + ``modality``, ``topk``, ``rerank`` → ranked gallery items;
* ``POST /gallery`` — enrol images (bearer token; 401 without or with a wrong one);
* ``GET /gallery/{id}``, ``/gallery/{id}/image``, ``/gallery/{id}/thumbnail``;
* ``GET /health``.

A client is never trusted (threat model in ``docs/serving.md``):

* the ``Host`` header must name an allowed host (DNS rebinding), checked before anything else;
* the token is checked from the headers before any byte of the body is read (enrolment always;
  search and gallery reads too when a token is set, unless ``public_reads``);
* every body is capped while it streams in (chunked uploads included), and a multipart form may
  hold only the parts its endpoint takes;
* an image's size is checked from its header before its pixels are decoded (pixels, aspect
  ratio, decode memory), and at most ``decode_slots`` decodes and forward passes run at once; a
  request that cannot get a slot soon gets 503 with ``Retry-After``;
* bad input gets a 4xx with a one-line reason (no traceback, no heap address); a damaged index
  gets 503; responses carry ``nosniff``, a content security policy and no-referrer headers.

No name sent by a client is ever used as a file path: stored files are content hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vireid.data.records import Modality
from vireid.errors import InputError
from vireid.retrieval.gallery_state import SINGLE_QUERY_METHODS
from vireid.serve.encoder import (
    MAX_ASPECT_RATIO,
    MAX_DECODE_BYTES,
    MAX_IMAGE_PIXELS,
    Encoder,
    ImageTooLarge,
    clean_message,
    decode_image,
    encode_images,
    load_encoder,
)
from vireid.serve.index import (
    GalleryIndex,
    GalleryItem,
    IndexDamaged,
    NewImage,
    SearchHit,
    add_to_index,
    compact,
    current_version,
)

log = logging.getLogger("vireid.serve")

STATIC_DIR = Path(__file__).with_name("static")
TOKEN_ENV = "VIREID_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16
MAX_TOPK = 200
MAX_ENROL_FILES = 64
#: Bytes a multipart form may add around its files (boundaries, part headers, small fields).
FORM_OVERHEAD = 64 * 1024
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServiceConfig:
    """Limits, credentials and search options of one service instance."""

    max_upload_bytes: int = 8 * 1024 * 1024
    max_enrol_bytes: int = 64 * 1024 * 1024
    max_pixels: int = MAX_IMAGE_PIXELS
    max_aspect: float = MAX_ASPECT_RATIO
    max_decode_bytes: int = MAX_DECODE_BYTES
    decode_slots: int = 2
    queue_limit: int = 32
    queue_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    token: str | None = None
    public_reads: bool = False
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    scan_dtype: str = "float32"
    first_stage: str = "int8"
    candidates: int = 256
    nprobe: int = 32
    threads: int = 1

    def validate(self) -> None:
        if self.token is not None:
            check_token(self.token, "token")
        for name in ("max_upload_bytes", "max_enrol_bytes", "max_pixels", "max_decode_bytes", "decode_slots"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_aspect < 1:
            raise InputError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if not self.allowed_hosts:
            raise InputError("allowed_hosts is empty: no request could reach the service")

    @property
    def reads_need_token(self) -> bool:
        return self.token is not None and not self.public_reads


def check_token(token: str, source: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise InputError(f"{source}: the token has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
                         f"(e.g. `openssl rand -hex 16`)")
    return token


def read_token(token_file: str | Path | None = None) -> str | None:
    """The token: ``$VIREID_SERVE_TOKEN``, else the first line of ``token_file`` (at least
    :data:`MIN_TOKEN_LENGTH` characters)."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return check_token(token, f"${TOKEN_ENV}")
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip().splitlines()[0].strip()
        except OSError as exc:
            raise InputError(f"{token_file}: cannot read token file ({exc.strerror})") from None
        except IndexError:
            token = ""
        if not token:
            raise InputError(f"{token_file}: token file is empty")
        return check_token(token, str(token_file))
    return None


def bind_warning(host: str) -> str | None:
    """A warning when ``host`` is not a loopback address (the service is then reachable from the network)."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass
    return (f"listening on {host}: the service is reachable from the network. Set a token "
            f"(${TOKEN_ENV} or --token-file), list the names clients use with --allowed-host, and put TLS in front.")


# ----------------------------------------------------------------------------------- the service


class Busy(Exception):
    """No decode/encode slot became free in time."""


class Slots:
    """At most ``slots`` decodes and forward passes at once; at most ``queue_limit`` requests wait,
    each for at most ``timeout`` seconds."""

    def __init__(self, slots: int, queue_limit: int, timeout: float) -> None:
        self.slots, self.queue_limit, self.timeout = slots, queue_limit, timeout
        self._semaphore: asyncio.Semaphore | None = None
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.slots)
        if self._semaphore.locked() and self.waiting >= self.queue_limit:
            raise Busy
        self.waiting += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.timeout)
        except TimeoutError:
            raise Busy from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._semaphore.release()


class Service:
    """The loaded index and encoder; enrolment commits a new version and swaps it in."""

    def __init__(self, index_dir: Path, config: ServiceConfig) -> None:
        self.index_dir = index_dir
        self.config = config
        self.index = GalleryIndex.open(index_dir, scan_dtype=config.scan_dtype, first_stage=config.first_stage,
                                       candidates=config.candidates, nprobe=config.nprobe)
        if self.index.model_file is None:
            raise InputError(f"{index_dir}: index has no stored model; build it with `vireid index build --model ...`")
        self.encoder: Encoder = load_encoder(self.index.model_file, threads=config.threads)
        self.index.warm_up()
        self._lock = threading.Lock()
        self._failed_version: str | None = None
        self._compacting = False

    def current(self) -> GalleryIndex:
        """The live version, reloaded first when another process committed a newer one; requests
        keep the version they started with (and its lease) until they finish. While an enrolment
        or a reload holds the lock, requests go on with the version in memory."""
        index = self.index
        live = current_version(self.index_dir)
        if live is not None and live != index.version and live != self._failed_version \
                and self._lock.acquire(blocking=False):
            try:
                if current_version(self.index_dir) != self.index.version:
                    self._reload()
            finally:
                self._lock.release()
        return self.index

    def _reload(self) -> None:
        try:
            index = GalleryIndex.open(self.index_dir, scan_dtype=self.config.scan_dtype,
                                      first_stage=self.config.first_stage, candidates=self.config.candidates,
                                      nprobe=self.config.nprobe, previous=self.index)
            index.warm_up()
            self.index = index
            self._failed_version = None
        except InputError as exc:  # keep serving the version in memory
            self._failed_version = current_version(self.index_dir)
            log.error("cannot load %s, still serving %s: %s", self._failed_version, self.index.version, exc)

    def decode(self, data: bytes, source: str) -> Any:
        c = self.config
        reduce_to = (2 * self.encoder.transform.width, 2 * self.encoder.transform.height)
        return decode_image(data, source, c.max_pixels, max_aspect=c.max_aspect, max_bytes=c.max_decode_bytes,
                            reduce_to=reduce_to)

    def encode(self, data: bytes, modality: Modality, source: str) -> Any:
        return encode_images(self.encoder, [self.decode(data, source)], modality)[0]

    def enrol(self, uploads: list[tuple[bytes, GalleryItem]]) -> tuple[list[int], GalleryIndex]:
        """Encode the uploads whose content the gallery lacks, then commit them as a new version."""
        import numpy as np

        images = [NewImage(item=item, data=data) for data, item in uploads]
        feats = np.zeros((len(images), self.index.dim), np.float32)
        encoded: set[int] = set()

        def encode_missing(index: GalleryIndex) -> None:
            known = index.known([new.sha256 for new in images if new.sha256])
            for i, new in enumerate(images):
                if new.sha256 not in known and i not in encoded:
                    feats[i] = self.encode(new.data or b"", Modality.parse(new.item.modality), new.item.name)
                    encoded.add(i)
                elif i not in encoded:
                    feats[i] = 1.0  # a placeholder: content already enrolled, the row is never stored

        encode_missing(self.current())
        with self._lock:
            current = self.current_locked()
            encode_missing(current)  # the gallery may have changed meanwhile (rarely anything to do)
            index, ids = add_to_index(self.index_dir, feats, images, current=current)
            self.index = index
            start = not self._compacting and index.needs_compaction()
            self._compacting = self._compacting or start
        if start:
            threading.Thread(target=self._compact, args=(index,), name="vireid-compaction", daemon=True).start()
        return ids, index

    def current_locked(self) -> GalleryIndex:
        if current_version(self.index_dir) != self.index.version:
            self._reload()
        return self.index

    def _compact(self, snapshot: GalleryIndex) -> None:
        try:
            compacted = compact(self.index_dir, snapshot)
            if compacted is not None:
                with self._lock:
                    if compacted.version > self.index.version:
                        self.index = compacted
        except Exception:  # never take the service down; the next enrolment tries again
            log.exception("compaction of %s failed", snapshot.version)
        finally:
            self._compacting = False


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": clean_message(message)}, headers=headers)


def _modality(value: str) -> Modality:
    try:
        return Modality.parse(value)
    except ValueError as exc:
        raise InputError(f"modality: {exc}") from None


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(status_code=413, detail=f"upload {upload.filename!r} exceeds the limit of {limit} bytes")
    if not data:
        raise InputError(f"upload {upload.filename!r} is empty")
    return data


def _item_json(index: int, item: GalleryItem) -> dict[str, Any]:
    hidden = ("source", "image", "sha256")
    out: dict[str, Any] = {"id": index, **{k: v for k, v in asdict(item).items() if k not in hidden}}
    if item.image is not None:
        out["image_url"] = f"/gallery/{index}/image"
        out["thumbnail_url"] = f"/gallery/{index}/thumbnail"
    return out


# ----------------------------------------------------------------------------------- the guard


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def _host_name(value: str) -> str:
    """The host of a ``Host`` header, without port (``[::1]:8000`` → ``::1``), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """Checks the ``Host`` header and the token from the headers, before the app reads a byte of
    the body; caps the time a body may take; adds the security headers to every response."""

    def __init__(self, app: ASGIApp, config: ServiceConfig) -> None:
        self.app = app
        self.config = config
        self.allowed = {_host_name(h) for h in config.allowed_hosts}

    def _needs_token(self, method: str, path: str) -> str | None:
        if method == "POST" and path.rstrip("/") == "/gallery":
            return "enrolment"
        if self.config.reads_need_token and (path.rstrip("/") == "/search" or path.startswith("/gallery")):
            return "reading the gallery"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        headers = Headers(scope=scope)
        if "*" not in self.allowed and _host_name(headers.get("host", "")) not in self.allowed:
            await _error(400, "invalid Host header")(scope, receive, secured)
            return
        need = self._needs_token(scope["method"], scope["path"])
        if need is not None:
            problem = _token_problem(headers.get("authorization"), self.config.token, need)
            if problem is not None:
                response = _error(401, problem, {"WWW-Authenticate": "Bearer", "Connection": "close"})
                await response(scope, receive, secured)
                return
        deadline = time.monotonic() + self.config.body_timeout_s

        async def timed_receive() -> Message:
            try:
                return await asyncio.wait_for(receive(), max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(status_code=408, detail="request body took too long") from None

        await self.app(scope, timed_receive, secured)


def _token_problem(authorization: str | None, token: str | None, need: str) -> str | None:
    if token is None:
        return f"{need} is disabled: the server has no token configured"
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return f"missing or wrong bearer token ({need} needs one)"
    return None


# ----------------------------------------------------------------------------------- the app


def create_app(index_dir: str | Path, config: ServiceConfig = ServiceConfig()) -> Any:
    """The ASGI application serving ``index_dir`` (FastAPI behind :class:`Guard`)."""
    config.validate()
    service = Service(Path(index_dir), config)
    slots = Slots(config.decode_slots, config.queue_limit, config.queue_timeout_s)
    app = FastAPI(title="vireid search", version="2", docs_url=None, redoc_url=None,
                  description="Visible-infrared person re-identification: search an enrolled gallery with a query "
                              "image of either modality, with AIM / SIM / k-reciprocal re-ranking.",
                  max_body_size=FORM_OVERHEAD)
    app.state.service = service
    search_body = config.max_upload_bytes + FORM_OVERHEAD
    enrol_body = config.max_enrol_bytes + FORM_OVERHEAD

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 413 and detail == "Content Too Large":
            detail = "request body exceeds the limit of this endpoint"
        return _error(exc.status_code, str(detail), dict(exc.headers or {}))

    @app.exception_handler(Busy)
    async def busy(_: Request, exc: Busy) -> JSONResponse:
        return _error(503, "too many images are being decoded; retry shortly", {"Retry-After": "1"})

    @app.exception_handler(ImageTooLarge)
    async def too_large(_: Request, exc: ImageTooLarge) -> JSONResponse:
        return _error(413, str(exc))

    @app.exception_handler(InputError)
    async def bad_input(_: Request, exc: InputError) -> JSONResponse:
        if isinstance(exc, IndexDamaged):
            log.error("%s", exc)
            return _error(503, "the index is unavailable (damaged file); the operator has been told in the log")
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return _error(400, f"invalid request: {problems}")

    @app.get("/health", summary="Liveness, index summary and what needs a token")
    def health() -> dict[str, Any]:
        index = service.current()
        return {"status": "ok", "version": index.version, "count": index.count, "dim": index.dim,
                "rerank": list(SINGLE_QUERY_METHODS), "preset": index.settings.rerank.preset,
                "auth": {"enrol": config.token is not None, "reads": config.reads_need_token}}

    @app.post("/search", summary="Rank the gallery for one query image", max_body_size=search_body,
              form_limits={"max_files": 1, "max_fields": 8, "max_part_size": 1024})
    async def search(
        image: Annotated[UploadFile, File(description="query image (JPEG, PNG, ...)")],
        modality: Annotated[str, Form(description="visible or infrared")] = "infrared",
        topk: Annotated[int, Form(ge=1, le=MAX_TOPK)] = 20,
        rerank: Annotated[str, Form(description=f"one of {', '.join(SINGLE_QUERY_METHODS)}")] = "aim",
    ) -> dict[str, Any]:
        mod = _modality(modality)
        if rerank not in SINGLE_QUERY_METHODS:
            raise InputError(f"rerank: unknown method {rerank!r}; choose one of {', '.join(SINGLE_QUERY_METHODS)}")
        async with slots.hold():
            data = await _read_upload(image, config.max_upload_bytes)
            return await _run_sync(_search, service, data, image.filename or "upload", mod, topk, rerank)

    @app.post("/gallery", summary="Enrol gallery images (bearer token required)", status_code=201,
              max_body_size=enrol_body,
              form_limits={"max_files": MAX_ENROL_FILES, "max_fields": 8, "max_part_size": 1024})
    async def enrol(
        images: Annotated[list[UploadFile], File(description=f"gallery images (at most {MAX_ENROL_FILES})")],
        modality: Annotated[str, Form()] = "visible",
        pid: Annotated[int | None, Form(description="person id, if known")] = None,
        cam: Annotated[int | None, Form(description="camera id, if known")] = None,
        time_taken: Annotated[str | None, Form(alias="time", description="capture time (ISO 8601)")] = None,
    ) -> dict[str, Any]:
        mod = _modality(modality)
        async with slots.hold():
            uploads = []
            for upload in images:
                data = await _read_upload(upload, config.max_upload_bytes)
                name = Path(upload.filename or "upload").name[:200]
                uploads.append((data, GalleryItem(name=name, modality=mod.label, pid=pid, cam=cam, time=time_taken)))
            ids, index = await _run_sync(service.enrol, uploads)
        return {"ids": ids, "version": index.version, "count": index.count}

    @app.get("/gallery/{item_id}", summary="Metadata of one gallery item")
    def gallery_item(item_id: int) -> dict[str, Any]:
        return _item_json(item_id, _lookup(service, item_id)[1])

    @app.get("/gallery/{item_id}/image", summary="The enrolled image", response_class=FileResponse)
    def gallery_image(item_id: int) -> FileResponse:
        return _file(service, item_id, thumbnail=False, private=config.reads_need_token)

    @app.get("/gallery/{item_id}/thumbnail", summary="A small JPEG of the enrolled image", response_class=FileResponse)
    def gallery_thumbnail(item_id: int) -> FileResponse:
        return _file(service, item_id, thumbnail=True, private=config.reads_need_token)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    guarded = Guard(app, config)
    guarded.state = app.state  # type: ignore[attr-defined]  # tests reach the service through it
    return guarded


async def _run_sync(fn: Any, *args: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _search(service: Service, data: bytes, name: str, modality: Modality, topk: int, rerank: str) -> dict[str, Any]:
    index = service.current()
    t0 = time.perf_counter()
    query = service.encode(data, modality, name)
    t1 = time.perf_counter()
    hits = index.search(query, rerank, topk)
    t2 = time.perf_counter()
    return search_response(index, hits, modality, rerank, encode_s=t1 - t0, search_s=t2 - t1)


def search_response(index: GalleryIndex, hits: list[SearchHit], modality: Modality, rerank: str, *,
                    encode_s: float, search_s: float) -> dict[str, Any]:
    """The JSON of one search (``POST /search`` and ``vireid search --json``): ``results`` in rank
    order, each with its served ``distance`` (>= 0, smaller = closer; see
    :data:`~vireid.serve.index.SERVED_DISTANCE_OFFSET`) and the item's metadata."""
    return {
        "version": index.version, "count": index.count, "modality": modality.label, "rerank": rerank,
        "timing_ms": {"encode": round(1000 * encode_s, 2), "search": round(1000 * search_s, 2)},
        "results": [{"rank": r + 1, "distance": hit.distance, **_item_json(hit.index, hit.item)}
                    for r, hit in enumerate(hits)],
    }


def _lookup(service: Service, item_id: int) -> tuple[GalleryIndex, GalleryItem]:
    index = service.current()
    if not 0 <= item_id < index.count:
        raise HTTPException(status_code=404, detail=f"gallery id {item_id} not found")
    return index, index.item(item_id)


def _file(service: Service, item_id: int, thumbnail: bool, private: bool) -> FileResponse:
    index, item = _lookup(service, item_id)
    path = index.image_path(item, thumbnail=thumbnail)
    if path is None or not path.is_file():
        raise HTTPException(status_code=404, detail=f"gallery id {item_id} has no stored image")
    cache = "private, max-age=3600" if private else "public, max-age=86400"
    return FileResponse(path, media_type="image/jpeg" if thumbnail else None, headers={"Cache-Control": cache})

