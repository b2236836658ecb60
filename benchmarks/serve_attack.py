"""Resource use of ``vireid serve`` under upload attacks: peak resident memory and temporary-file
bytes of the server process while each attack runs, and the answers it gave.

The server runs in its own process on 127.0.0.1 (``--src``: the source tree to run, e.g. an older
checkout, whose own CLI also builds the index), with a token set. Attacks:

* ``gallery-200MB-no-token``: a 200 MiB multipart ``POST /gallery`` with a Content-Length, no token;
* ``search-100MB-chunked``: a 100 MiB chunked ``POST /search`` (token given);
* ``png-1x39M``: one 1 × 39,000,000-pixel PNG (~75 KB) to ``POST /search``;
* ``png-1x39M-x4``: four of them at once.

    python benchmarks/serve_attack.py --json attack.json
    python benchmarks/serve_attack.py --src /path/to/older/src
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test suite's model and server harness

from test_serve_support import (  # noqa: E402
    ResourceSampler,
    ServerProcess,
    make_checkpoint,
    multipart_stream,
    send_raw,
    write_gallery,
)

TOKEN = "attack-benchmark-token-7c0a"
MULTIPART = {"Content-Type": "multipart/form-data; boundary=vireidboundary"}


def build_index(folder: Path, src: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(src)}
    onnx = folder / "model.onnx"
    write_gallery(folder / "gallery", range(1, 9), 3)
    for command in (["export", "--checkpoint", str(make_checkpoint(folder)), "--out", str(onnx)],
                    ["index", "build", "--model", str(onnx), "--images", str(folder / "gallery"),
                     "--out", str(folder / "index")]):
        subprocess.run([sys.executable, "-m", "vireid", *command], env=env, check=True, capture_output=True)
    return folder / "index"


def thin_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (1, 39_000_000)).save(out, format="PNG", compress_level=9)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO / "src", help="source tree of the server to attack")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import httpx

    png = thin_png()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, spool = Path(tmp), Path(tmp) / "spool"
        spool.mkdir()
        index = build_index(folder, args.src.resolve())
        with ServerProcess(index, env={"VIREID_SERVE_TOKEN": TOKEN, "TMPDIR": str(spool)}, src=args.src.resolve()) as server:
            auth = {"Authorization": f"Bearer {TOKEN}"}

            def post_png(_: int) -> int:
                with httpx.Client(base_url=server.url, headers=auth, timeout=600) as client:
                    return client.post("/search", files={"image": ("thin.png", png, "image/png")}).status_code

            attacks = {
                "gallery-200MB-no-token": lambda: [send_raw(
                    server.url, "POST", "/gallery", {**MULTIPART, "Content-Length": str(200 * 2**20 + 200)},
                    multipart_stream("images", "big.jpg", 200 * 2**20), chunked=False)],
                "search-100MB-chunked": lambda: [send_raw(
                    server.url, "POST", "/search", {**MULTIPART, **auth}, multipart_stream("image", "big.jpg", 100 * 2**20))],
                "png-1x39M": lambda: [post_png(0)],
                "png-1x39M-x4": lambda: list(ThreadPoolExecutor(4).map(post_png, range(4))),
            }
            for name, attack in attacks.items():
                hwm = server.memory_kib("VmHWM")
                with ResourceSampler(server, spool) as sample:
                    statuses = attack()
                results[name] = {"statuses": statuses, "peak_rss_increase_mib": round(sample.peak_rss_mib, 1),
                                 "peak_temp_file_mib": round(sample.peak_disk_mib, 1),
                                 "hwm_increase_mib": round((server.memory_kib("VmHWM") - hwm) / 1024, 1)}
                print(f"{name:>24}: answers {statuses}, peak RSS +{sample.peak_rss_mib:.0f} MiB "
                      f"(high-water mark +{results[name]['hwm_increase_mib']:.0f} MiB), "
                      f"temporary files up to {sample.peak_disk_mib:.0f} MiB", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
