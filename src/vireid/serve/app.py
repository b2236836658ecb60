"""The search service: FastAPI app over a gallery index, with a web page at ``/``.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

* ``POST /search`` — multipart ``image`` + ``modality``, ``topk``, ``rerank`` → ranked gallery items;
* ``POST /gallery`` — enrol images (bearer token; 401 without or with a wrong one);
* ``GET /gallery/{id}``, ``/gallery/{id}/image``, ``/gallery/{id}/thumbnail``;
* ``GET /health``.

Bad input never reaches a 500: unreadable or truncated images → 400, uploads over the size
limit → 413, images over the pixel limit (decompression bombs) → 413, bad fields → 400.
No name sent by a client is ever used as a file path: stored files are content hashes.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from vireid.data.records import Modality
from vireid.errors import InputError
from vireid.serve.encoder import MAX_IMAGE_PIXELS, Encoder, ImageTooLarge, decode_image, encode_images, load_encoder
from vireid.serve.index import GalleryIndex, GalleryItem, NewImage, add_to_index, current_version
from vireid.serve.rerank import RERANK_METHODS

STATIC_DIR = Path(__file__).with_name("static")
TOKEN_ENV = "VIREID_SERVE_TOKEN"
MAX_TOPK = 200
MAX_ENROL_FILES = 64


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and credentials of one service instance."""

    max_upload_bytes: int = 8 * 1024 * 1024
    max_pixels: int = MAX_IMAGE_PIXELS
    token: str | None = None
    scan_dtype: str = "float32"
    first_stage: str = "int8"
    candidates: int = 256
    nprobe: int = 32
    threads: int = 1


def read_token(token_file: str | Path | None = None) -> str | None:
    """The enrolment token: ``$VIREID_SERVE_TOKEN``, else the first line of ``token_file``."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(f"{token_file}: cannot read token file ({exc.strerror})") from None
        if not token:
            raise InputError(f"{token_file}: token file is empty")
        return token
    return None


class Service:
    """The loaded index and encoder; enrolment swaps in a new index version atomically."""

    def __init__(self, index_dir: Path, config: ServiceConfig) -> None:
        self.index_dir = index_dir
        self.config = config
        self.index = self._open()
        if self.index.model_file is None:
            raise InputError(f"{index_dir}: index has no stored model; build it with `vireid index build --model ...`")
        self.encoder: Encoder = load_encoder(self.index.model_file, threads=config.threads)
        self._enrol_lock = threading.Lock()

    def current(self) -> GalleryIndex:
        """The loaded index, reloaded first when ``CURRENT`` names a newer version (e.g. after
        ``vireid index add`` from another process); requests keep the old one meanwhile."""
        if current_version(self.index_dir) != self.index.version:
            with self._enrol_lock:
                if current_version(self.index_dir) != self.index.version:
                    self.index = self._open()
        return self.index

    def _open(self) -> GalleryIndex:
        c = self.config
        return GalleryIndex.open(self.index_dir, scan_dtype=c.scan_dtype, first_stage=c.first_stage,
                                 candidates=c.candidates, nprobe=c.nprobe)

    def encode(self, data: bytes, modality: Modality, source: str) -> Any:
        image = decode_image(data, source, self.config.max_pixels)
        return encode_images(self.encoder, [image], modality)[0]

    def enrol(self, uploads: list[tuple[bytes, GalleryItem]]) -> list[int]:
        import numpy as np

        feats, images = [], []
        for data, item in uploads:
            feats.append(self.encode(data, Modality.parse(item.modality), item.name))
            images.append(NewImage(item=item, data=data))
        with self._enrol_lock:
            _, ids = add_to_index(self.index_dir, np.stack(feats), images)
            self.index = self._open()
        return list(ids)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


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
    out: dict[str, Any] = {"id": index, **{k: v for k, v in asdict(item).items() if k not in ("source", "image")}}
    if item.image is not None:
        out["image_url"] = f"/gallery/{index}/image"
        out["thumbnail_url"] = f"/gallery/{index}/thumbnail"
    return out


def create_app(index_dir: str | Path, config: ServiceConfig = ServiceConfig()) -> FastAPI:
    """The FastAPI application serving ``index_dir``."""
    service = Service(Path(index_dir), config)
    app = FastAPI(title="vireid search", version="1",
                  description="Visible-infrared person re-identification: search an enrolled gallery with a query "
                              "image of either modality, with AIM / SIM / k-reciprocal re-ranking.")
    app.state.service = service

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        limit = config.max_upload_bytes * (MAX_ENROL_FILES if request.url.path == "/gallery" else 1) + 64 * 1024
        if length is not None and (not length.isdigit() or int(length) > limit):
            return _error(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
        return await call_next(request)

    @app.exception_handler(ImageTooLarge)
    async def too_large(_: Request, exc: ImageTooLarge) -> JSONResponse:
        return _error(413, str(exc))

    @app.exception_handler(InputError)
    async def bad_input(_: Request, exc: InputError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return _error(400, f"invalid request: {problems}")

    @app.get("/health", summary="Liveness and index summary")
    def health() -> dict[str, Any]:
        index = service.current()
        return {"status": "ok", "version": index.version, "count": index.count, "dim": index.dim,
                "rerank": list(RERANK_METHODS)}

    @app.post("/search", summary="Rank the gallery for one query image")
    async def search(
        image: Annotated[UploadFile, File(description="query image (JPEG, PNG, ...)")],
        modality: Annotated[str, Form(description="visible or infrared")] = "infrared",
        topk: Annotated[int, Form(ge=1, le=MAX_TOPK)] = 20,
        rerank: Annotated[str, Form(description=f"one of {', '.join(RERANK_METHODS)}")] = "aim",
    ) -> dict[str, Any]:
        data = await _read_upload(image, config.max_upload_bytes)
        mod = _modality(modality)
        if rerank not in RERANK_METHODS:
            raise InputError(f"rerank: unknown method {rerank!r}; choose one of {', '.join(RERANK_METHODS)}")
        return await _run_sync(_search, service, data, image.filename or "upload", mod, topk, rerank)

    @app.post("/gallery", summary="Enrol gallery images (bearer token required)", status_code=201)
    async def enrol(
        images: Annotated[list[UploadFile], File(description="gallery images")],
        authorization: Annotated[str | None, Header()] = None,
        modality: Annotated[str, Form()] = "visible",
        pid: Annotated[int | None, Form(description="person id, if known")] = None,
        cam: Annotated[int | None, Form(description="camera id, if known")] = None,
        time_taken: Annotated[str | None, Form(alias="time", description="capture time (ISO 8601)")] = None,
    ) -> dict[str, Any]:
        _check_token(authorization, config.token)
        if len(images) > MAX_ENROL_FILES:
            raise InputError(f"at most {MAX_ENROL_FILES} images per request, got {len(images)}")
        mod = _modality(modality)
        uploads = []
        for upload in images:
            data = await _read_upload(upload, config.max_upload_bytes)
            name = Path(upload.filename or "upload").name[:200]
            uploads.append((data, GalleryItem(name=name, modality=mod.label, pid=pid, cam=cam, time=time_taken)))
        ids = await _run_sync(service.enrol, uploads)
        return {"ids": ids, "version": service.index.version, "count": service.index.count}

    @app.get("/gallery/{item_id}", summary="Metadata of one gallery item")
    def gallery_item(item_id: int) -> dict[str, Any]:
        return _item_json(item_id, _lookup(service, item_id))

    @app.get("/gallery/{item_id}/image", summary="The enrolled image", response_class=FileResponse)
    def gallery_image(item_id: int) -> FileResponse:
        return _file(service, item_id, thumbnail=False)

    @app.get("/gallery/{item_id}/thumbnail", summary="A small JPEG of the enrolled image", response_class=FileResponse)
    def gallery_thumbnail(item_id: int) -> FileResponse:
        return _file(service, item_id, thumbnail=True)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


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
    return {
        "version": index.version, "count": index.count, "modality": modality.label, "rerank": rerank,
        "timing_ms": {"encode": round(1000 * (t1 - t0), 2), "search": round(1000 * (t2 - t1), 2)},
        "results": [{"rank": r + 1, "distance": hit.distance, **_item_json(hit.index, hit.item)}
                    for r, hit in enumerate(hits)],
    }


def _check_token(authorization: str | None, token: str | None) -> None:
    challenge = {"WWW-Authenticate": "Bearer"}
    if token is None:
        raise HTTPException(status_code=401, detail="enrolment is disabled: the server has no token configured",
                            headers=challenge)
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong bearer token", headers=challenge)


def _lookup(service: Service, item_id: int) -> GalleryItem:
    index = service.current()
    if not 0 <= item_id < index.count:
        raise HTTPException(status_code=404, detail=f"gallery id {item_id} not found (ids 0..{index.count - 1})")
    return index.item(item_id)


def _file(service: Service, item_id: int, thumbnail: bool) -> FileResponse:
    item = _lookup(service, item_id)
    path = service.index.image_path(item, thumbnail=thumbnail)
    if path is None or not path.is_file():
        raise HTTPException(status_code=404, detail=f"gallery id {item_id} has no stored image")
    return FileResponse(path, media_type="image/jpeg" if thumbnail else None,
                        headers={"Cache-Control": "public, max-age=86400"})
