"""Load test of ``vireid serve`` over HTTP: concurrent searches with and without enrolments.

A gallery of G synthetic features (the golden data's model, d = 512) is indexed with the test
suite's tiny exported encoder (resnet10 at 32×16), ``vireid serve`` runs in its own process on
127.0.0.1 with a token, and ``--clients`` threads each send ``--requests`` requests, first searches
only, then with every ``1/enrol-fraction``-th request of each client an enrolment of a new image
(``POST /gallery``). Reports errors (any non-2xx answer, a short result list, or no answer within
``--timeout`` seconds) and p50/p95 of each request kind, and what the server logged at warning
level or above.

    python benchmarks/serve_load.py --gallery 20000 --clients 16 --requests 50 --json load.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's model and server harness

from search import synthetic_features  # noqa: E402
from test_serve_support import ServerProcess, make_checkpoint, person_image  # noqa: E402

TOKEN = "load-test-token-0d9e4b7a"


def build(folder: Path, gallery: int, seed: int) -> Path:
    from vireid.data.records import Modality
    from vireid.engine.checkpoint import load_checkpoint_model
    from vireid.serve.encoder import decode_image, encode_images, export_onnx, load_encoder, transform_summary
    from vireid.serve.index import GalleryItem, IndexSettings, NewImage, build_index, store_model

    model, cfg = load_checkpoint_model(make_checkpoint(folder))
    onnx = folder / "model.onnx"
    export_onnx(model, cfg.transforms, onnx)
    encoder = load_encoder(onnx)
    dim = int(encode_images(encoder, [decode_image(person_image(1, 0), "probe")], Modality.VISIBLE).shape[1])
    feats, _ = synthetic_features(gallery, 1, dim, seed)
    index = folder / "index"
    entry = store_model(index, onnx, {"kind": "onnx", "transform": transform_summary(encoder.transform)})
    items = [NewImage(GalleryItem(name=f"g{i:06d}.jpg", pid=i // 10, cam=1 + i % 4)) for i in range(gallery)]
    build_index(index, feats, items, settings=IndexSettings(), model=entry)
    return index


def run_phase(url: str, clients: int, requests: int, enrol_every: int | None, phase: int,
              timeout: float = 120.0) -> dict[str, object]:
    import httpx

    times: dict[str, list[float]] = {"search": [], "enrol": []}
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            for r in range(requests):
                enrol = enrol_every is not None and (r + c) % enrol_every == 0
                start = time.perf_counter()
                problem = None
                try:
                    if enrol:
                        image = person_image(100_000 + phase * 10_000 + c * requests + r, 0)
                        response = session.post("/gallery", data={"pid": str(900_000 + c), "cam": "1"},
                                                files={"images": (f"new_{c}_{r}.jpg", image, "image/jpeg")})
                        ok = response.status_code == 201 and len(response.json()["ids"]) == 1
                    else:
                        image = person_image(1 + (c * requests + r) % 50, 20 + r % 7)
                        response = session.post("/search", files={"image": ("q.jpg", image, "image/jpeg")},
                                                data={"modality": "infrared", "topk": "20"})
                        ok = response.status_code == 200 and len(response.json()["results"]) == 20
                    if not ok:
                        problem = f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    problem = f"{'enrol' if enrol else 'search'}: {type(exc).__name__} after {timeout:g} s"
                elapsed = time.perf_counter() - start
                with lock:
                    if problem is None:
                        times["enrol" if enrol else "search"].append(elapsed)
                    else:
                        errors.append(problem)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    out: dict[str, object] = {"errors": len(errors), "error_samples": errors[:5], "wall_s": wall,
                              "requests_per_s": clients * requests / wall}
    for kind, values in times.items():
        if values:
            p50, p95 = np.percentile(np.asarray(values) * 1000, [50, 95])
            out[kind] = {"n": len(values), "p50_ms": float(p50), "p95_ms": float(p95)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="requests per client and phase")
    parser.add_argument("--enrol-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits for one answer")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--server-log", type=Path, default=None, help="write the server's stderr here")
    args = parser.parse_args()
    results: dict[str, object] = {"gallery": args.gallery, "clients": args.clients, "requests": args.requests,
                                  "enrol_fraction": args.enrol_fraction, "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index = build(Path(tmp), args.gallery, args.seed)
        results["build_s"] = time.perf_counter() - start
        with ServerProcess(index, env={"VIREID_SERVE_TOKEN": TOKEN}) as server:
            run_phase(server.url, 2, 5, None, 0)  # warm-up
            results["searches_only"] = run_phase(server.url, args.clients, args.requests, None, 1, args.timeout)
            every = max(1, round(1 / args.enrol_fraction))
            results["with_enrolments"] = run_phase(server.url, args.clients, args.requests, every, 2, args.timeout)
            if args.server_log is not None:
                args.server_log.write_text(server.log_text())
            logged = [line for line in server.log_text().splitlines()
                      if line.split(":", 1)[0] in ("WARNING", "ERROR", "CRITICAL") or "Traceback" in line]
            results["server_problems"] = logged[:20]
    results["load_average_end"] = os.getloadavg()
    for phase in ("searches_only", "with_enrolments"):
        row = results[phase]
        assert isinstance(row, dict)
        parts = [f"{kind} p50 {row[kind]['p50_ms']:.1f} / p95 {row[kind]['p95_ms']:.1f} ms (n={row[kind]['n']})"
                 for kind in ("search", "enrol") if kind in row]
        print(f"{phase}: {row['errors']} errors, {row['requests_per_s']:.1f} requests/s; " + "; ".join(parts))
    for line in results["server_problems"]:  # type: ignore[union-attr]
        print(f"server: {line}")
    print(f"index of {args.gallery:,} items built in {results['build_s']:.1f} s; load average "
          f"{' '.join(f'{x:.1f}' for x in results['load_average_start'])} -> "  # type: ignore[union-attr]
          f"{' '.join(f'{x:.1f}' for x in results['load_average_end'])}")  # type: ignore[union-attr]
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
