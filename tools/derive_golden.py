"""Derive the in-repository golden test data (``tests/golden/``) from the public golden set.

The public golden set (``sysu_like.npz``, ``regdb_like.npz``, ``sysu_gallery_sampling.json``, 34 MB) holds
outputs of the reference implementations listed in ``tests/golden/README.md``.  The tests need much less:

* the features, ids, cameras and every reference metric, unchanged;
* for the distance comparisons (float64, <= 1e-9): a few full rows of every ``dist_<M>`` in float64 —
  the queries of the identity without a valid match, the rows whose values come closest to a tie
  (float32 rounding makes them ties), and rows spread evenly over the query list (both cameras);
* for the metric comparisons: every query's ranking of the gallery, cut after the last gallery item of
  the query's identity (``order_<M>`` flat uint16 gallery indices, ``order_len_<M>`` the cut per query).
  The metrics (CMC, AP, INP, under any protocol's removal rule) depend only on that prefix: the tests
  rebuild a distance matrix with the same prefix order and every later item tied after it;
* RegDB thermal->visible: AGW's ``eval_regdb`` run on every transposed RegDB-like matrix with the ids
  swapped (exactly AGW ``test.py``'s thermal->visible call), so the evaluator is pinned in both
  directions.  This needs AGW's ``eval_metrics.py`` (commit e817a26, checked by sha256);
* the SYSU-MM01 gallery selections, unchanged, as xz-compressed JSON.

Usage (not run in CI; the output is committed)::

    python tools/derive_golden.py --source ../shared/golden \\
        --agw-eval /path/to/Cross-Modal-Re-ID-baseline/eval_metrics.py --out tests/golden

Every derived array is checked before writing: the rebuilt rankings give the reference metrics under
AGW's own evaluator, and the stored rows equal the source rows bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import lzma
import os
import tempfile
from pathlib import Path

import numpy as np

AGW_EVAL_SHA256 = "a7976c5a2ad2cd67a164b2017fd51355525aa3f7a2093e47a45cf79b0b5f2220"
COPIED_KEYS = ("query_feat", "gallery_feat", "query_id", "gallery_id", "query_cam", "gallery_cam", "meta_json")
ROWS = {"sysu": 16, "regdb": 10}
TIE_ROWS = 3


def load_agw_eval(path: Path):
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != AGW_EVAL_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not AGW eval_metrics.py at e817a26 ({AGW_EVAL_SHA256})")
    spec = importlib.util.spec_from_file_location("agw_eval_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prefix_order(dist: np.ndarray, query_id: np.ndarray, gallery_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ranking cut after its last same-identity gallery item (kept or removed by the protocol)."""
    order = np.argsort(dist, axis=1, kind="stable")
    same = gallery_id[order] == query_id[:, None]
    lengths = np.where(same.any(1), same.shape[1] - np.argmax(same[:, ::-1], axis=1), 0)
    flat = np.concatenate([order[i, :n] for i, n in enumerate(lengths)])
    return flat.astype(np.uint16), lengths.astype(np.uint16)


def ranking_from_prefix(flat: np.ndarray, lengths: np.ndarray, num_gallery: int) -> np.ndarray:
    """Mirror of the tests' rebuild: prefix positions 0..n-1, every other item tied at n."""
    out = np.repeat(lengths.astype(np.float64)[:, None], num_gallery, axis=1)
    for i, (start, n) in enumerate(zip(np.cumsum(lengths) - lengths, lengths)):
        out[i, flat[start:start + n].astype(np.int64)] = np.arange(n)
    return out


def near_tie_score(dist: np.ndarray) -> np.ndarray:
    """Per row: the number of values that become ties in float32."""
    low = np.sort(dist.astype(np.float32), axis=1)
    return (np.diff(low, axis=1) == 0).sum(1)


def select_rows(data: dict[str, np.ndarray], kind: str) -> np.ndarray:
    q_id = data["query_id"]
    chosen: list[int] = []
    if kind == "sysu":  # every query of the identity whose cam-3 queries have no valid match
        chosen += np.flatnonzero(q_id == data["edge_pid"]).tolist()
    ties = sum(near_tie_score(data[k]) for k in data if k.startswith("dist_"))
    chosen += [int(i) for i in np.argsort(-ties, kind="stable")[:TIE_ROWS] if i not in chosen]
    spread = np.linspace(0, len(q_id) - 1, ROWS[kind] - len(chosen)).round().astype(int)
    for i in spread:  # evenly over the query list (both cameras), stepping past rows already chosen
        while int(i) in chosen:
            i += 1
        chosen.append(int(i))
    return np.array(sorted(chosen), dtype=np.int64)


def check_metrics(agw, data: dict, method: str, rebuilt: np.ndarray, kind: str) -> None:
    if kind == "sysu":
        cmc, mAP, mINP = agw.eval_sysu(rebuilt, data["query_id"], data["gallery_id"], data["query_cam"],
                                       data["gallery_cam"])
    else:
        cmc, mAP, mINP = agw.eval_regdb(rebuilt, data["query_id"], data["gallery_id"])
    assert np.array_equal(cmc, data[f"cmc_{method}"]), (kind, method)
    assert abs(mAP - data[f"mAP_{method}"]) < 1e-12 and abs(mINP - data[f"mINP_{method}"]) < 1e-12, (kind, method)


def derive(source: Path, kind: str, agw) -> dict[str, np.ndarray]:
    with np.load(source / f"{kind}_like.npz") as z:
        data = {k: z[k] for k in z.files}
    out = {k: data[k] for k in COPIED_KEYS}
    if kind == "sysu":
        out["edge_pid"] = data["edge_pid"]
    rows = select_rows(data, kind)
    out["rows"] = rows
    num_gallery = len(data["gallery_id"])
    for key in sorted(k for k in data if k.startswith("dist_")):
        method = key[len("dist_"):]
        dist = data[key]
        out[key] = dist[rows].copy()
        flat, lengths = prefix_order(dist, data["query_id"], data["gallery_id"])
        rebuilt = ranking_from_prefix(flat, lengths, num_gallery)
        check_metrics(agw, data, method, rebuilt, kind)
        out[f"order_{method}"], out[f"order_len_{method}"] = flat, lengths
        for name in ("cmc", "mAP", "mINP"):
            out[f"{name}_{method}"] = data[f"{name}_{method}"]
        if kind == "regdb":  # thermal -> visible: AGW test.py swaps the roles and the ids
            cmc, mAP, mINP = agw.eval_regdb(dist.T.copy(), data["gallery_id"], data["query_id"])
            out[f"cmc_{method}_t2v"] = np.asarray(cmc, dtype=np.float32)
            out[f"mAP_{method}_t2v"], out[f"mINP_{method}_t2v"] = np.float64(mAP), np.float64(mINP)
            flat, lengths = prefix_order(dist.T, data["gallery_id"], data["query_id"])
            rebuilt = ranking_from_prefix(flat, lengths, len(data["query_id"]))
            again = agw.eval_regdb(rebuilt, data["gallery_id"], data["query_id"])
            assert np.array_equal(again[0], cmc) and again[1] == mAP and again[2] == mINP, method
            out[f"order_{method}_t2v"], out[f"order_len_{method}_t2v"] = flat, lengths
    return out


def write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/golden"),
                        help="folder of the public golden set (default: ../shared/golden)")
    parser.add_argument("--agw-eval", type=Path, required=True,
                        help="AGW's eval_metrics.py at commit e817a26 (checked by sha256)")
    parser.add_argument("--out", type=Path, default=Path("tests/golden"), help="output folder (default: tests/golden)")
    args = parser.parse_args()
    if not (args.source / "sysu_like.npz").is_file():
        raise SystemExit(f"{args.source}: no sysu_like.npz (the public golden set)")
    agw = load_agw_eval(args.agw_eval)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in ("sysu", "regdb"):
        arrays = derive(args.source, kind, agw)
        target = args.out / f"{kind}_like.npz"
        write_atomic(target, lambda tmp, arrays=arrays: _save_npz(tmp, arrays))
        print(f"{target}: {target.stat().st_size / 1e6:.2f} MB, rows {arrays['rows'].tolist()}")
    sampling = (args.source / "sysu_gallery_sampling.json").read_bytes()
    json.loads(sampling)
    target = args.out / "sysu_gallery_sampling.json.xz"
    write_atomic(target, lambda tmp: Path(tmp).write_bytes(lzma.compress(sampling, preset=9 | lzma.PRESET_EXTREME)))
    assert lzma.decompress(target.read_bytes()) == sampling
    print(f"{target}: {target.stat().st_size / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
