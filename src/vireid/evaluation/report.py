"""Presenting results: a percent table for the terminal, the JSON result, and an HTML report.

Numbers are fractions everywhere except in the printed table and the HTML (percent).
The HTML report is one self-contained file: CMC curves as inline SVG and rank lists whose
images are embedded as small base64 JPEG thumbnails.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vireid.errors import InputError
from vireid.evaluation.evaluator import ProtocolEvaluation
from vireid.evaluation.metrics import EvalResult, Protocol, stable_argsort
from vireid.features import FeatureSet
from vireid.io import write_json_atomic, write_text_atomic

TABLE_RANKS = (1, 5, 10, 20)
CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def format_table(rows: Sequence[tuple[str, EvalResult]], ranks: Sequence[int] = TABLE_RANKS) -> str:
    """A fixed-width table, metrics in percent, one row per (name, result)."""
    header = ["method", *(f"R{k}" for k in ranks), "mAP", "mINP", "valid/queries"]
    body = [[name, *(f"{100 * r.rank(k):.2f}" for k in ranks), f"{100 * r.mAP:.2f}", f"{100 * r.mINP:.2f}",
             f"{r.num_valid}/{r.num_queries}"] for name, r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluation_to_dict(evaluation: ProtocolEvaluation) -> dict[str, Any]:
    """The JSON result: mean metrics (fractions), protocol, distance, per-trial results.

    Keys: ``cmc`` (list, ranks 1..len), ``mAP``, ``mINP``, ``num_queries``, ``num_valid``,
    ``num_skipped`` (totals over trials), ``protocol`` (name, CMC kind, removal rule, reference,
    ``max_rank``, ``num_trials``), ``distance`` (method and, when re-ranked, variant and every
    parameter), ``trials`` (the same metric keys per trial).
    """
    mean = evaluation.mean
    return {
        **mean.to_dict(),
        "protocol": {**evaluation.protocol.to_dict(), "max_rank": evaluation.max_rank,
                     "num_trials": len(evaluation.trials)},
        "distance": evaluation.distance,
        "trials": [trial.to_dict() for trial in evaluation.trials],
    }


def write_result_json(path: str | os.PathLike[str], evaluation: ProtocolEvaluation) -> None:
    """Write :func:`evaluation_to_dict` atomically."""
    write_json_atomic(path, evaluation_to_dict(evaluation))


@dataclass
class RankList:
    """One query and its top gallery items (best first) for the HTML report."""

    query_path: str
    query_id: int
    gallery_paths: list[str]
    gallery_ids: list[int]
    distances: list[float]

    @property
    def matches(self) -> list[bool]:
        return [gid == self.query_id for gid in self.gallery_ids]


def top_rank_lists(
    dist: np.ndarray, query_paths: Sequence[str], gallery_paths: Sequence[str], query_id: np.ndarray,
    gallery_id: np.ndarray, query_cam: np.ndarray, gallery_cam: np.ndarray, protocol: Protocol,
    query_rows: Sequence[int], top: int = 10,
) -> list[RankList]:
    """The ``top`` kept gallery items of each query in ``query_rows`` under ``protocol`` (ties by gallery row)."""
    lists = []
    for row in query_rows:
        distances = np.asarray(dist[row], dtype=np.float64).copy()
        removed = protocol.remove(query_id[row], query_cam[row], gallery_id, gallery_cam)
        distances[removed] = np.inf
        order = stable_argsort(distances[None, :])[0]
        order = order[~removed[order]][:top]
        lists.append(RankList(str(query_paths[row]), int(query_id[row]), [str(gallery_paths[g]) for g in order],
                              [int(gallery_id[g]) for g in order], [float(distances[g]) for g in order]))
    return lists


def feature_rank_lists(
    features: FeatureSet, dist: np.ndarray, protocol: Protocol, *, count: int = 8, seed: int = 0, top: int = 10,
) -> list[RankList]:
    """Rank lists of ``count`` seeded queries of a single-trial feature set that has image paths.

    ``features.extras`` must hold ``query_path`` and ``gallery_path``; ``dist`` is its (Q, G) distance.
    """
    missing = [key for key in ("query_path", "gallery_path") if key not in features.extras]
    if missing:
        raise InputError(f"feature set has no {' / '.join(missing)}: image paths are needed for rank lists")
    rows = select_queries(len(features.query_id), count, seed)
    return top_rank_lists(dist, features.extras["query_path"], features.extras["gallery_path"], features.query_id,
                          features.gallery_id, features.query_cam, features.gallery_cam, protocol, rows, top)


def select_queries(num_queries: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct query rows drawn with ``numpy.random.default_rng(seed)``, ascending."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_queries, size=min(count, num_queries), replace=False))


def thumbnail_data_uri(path: str | os.PathLike[str], size: tuple[int, int] = (64, 128), quality: int = 80) -> str:
    """A ``data:image/jpeg;base64,...`` URI of the image at ``path`` fitted into ``size`` (width, height)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail(size)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: cannot read image for the report ({exc})") from None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def cmc_svg(curves: Mapping[str, np.ndarray], width: int = 520, height: int = 340) -> str:
    """CMC curves (fractions, rank 1 first) as an inline SVG line chart in percent."""
    if not curves:
        raise InputError("no CMC curve to plot")
    left, right, top, bottom = 48, 150, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    max_rank = max(len(c) for c in curves.values())
    x = lambda rank: left + (rank - 1) / max(max_rank - 1, 1) * plot_w  # noqa: E731
    y = lambda value: top + (1 - value) * plot_h  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">']
    for tick in range(0, 101, 20):
        ty = y(tick / 100)
        parts.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{left + plot_w}" y2="{ty:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end">{tick}</text>')
    for rank in sorted({1, *range(5, max_rank + 1, 5)}):
        parts.append(f'<text x="{x(rank):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{rank}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>'
                 f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">rank</text>'
                 f'<text x="12" y="{top + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + plot_h / 2})">matching rate (%)</text>')
    for i, (name, cmc) in enumerate(curves.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        points = " ".join(f"{x(r + 1):.1f},{y(float(v)):.1f}" for r, v in enumerate(cmc))
        ly = top + 14 + 18 * i
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>'
                     f'<line x1="{left + plot_w + 12}" y1="{ly - 4}" x2="{left + plot_w + 32}" y2="{ly - 4}" '
                     f'stroke="{colour}" stroke-width="2"/>'
                     f'<text x="{left + plot_w + 38}" y="{ly}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def rank_list_html(rank_list: RankList, thumbnail_size: tuple[int, int] = (64, 128)) -> str:
    """One row: the query image, then its ranked gallery images framed green (match) or red."""
    cells = [f'<figure class="query"><img src="{thumbnail_data_uri(rank_list.query_path, thumbnail_size)}" '
             f'alt="query"><figcaption>query id {rank_list.query_id}</figcaption></figure>']
    for rank, (path, gid, dist, match) in enumerate(zip(rank_list.gallery_paths, rank_list.gallery_ids,
                                                        rank_list.distances, rank_list.matches), start=1):
        cells.append(f'<figure class="{"match" if match else "miss"}"><img src="{thumbnail_data_uri(path, thumbnail_size)}" '
                     f'alt="rank {rank}" title="{html.escape(path)} d={dist:.4f}">'
                     f'<figcaption>{rank}: id {gid}</figcaption></figure>')
    return f'<div class="ranklist">{"".join(cells)}</div>'


_STYLE = """
body{font-family:sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 24px}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
.ranklist{display:flex;gap:6px;align-items:flex-start;margin:6px 0 12px}
figure{margin:0;text-align:center;font-size:11px}img{display:block;border:3px solid transparent}
.query img{border-color:#333}.match img{border-color:#2ca02c}.miss img{border-color:#d62728}
.query{margin-right:14px}
"""


def render_html_report(
    title: str, results: Sequence[tuple[str, EvalResult]], *, rank_lists: Mapping[str, Sequence[RankList]] | None = None,
    notes: Sequence[str] = (), thumbnail_size: tuple[int, int] = (64, 128),
) -> str:
    """The report page: notes, metric table (percent), CMC curves, rank lists per method."""
    header = "".join(f"<th>{h}</th>" for h in ["method", *(f"R{k}" for k in TABLE_RANKS), "mAP", "mINP", "valid/queries"])
    rows = "".join(
        "<tr>" + f"<td>{html.escape(name)}</td>"
        + "".join(f"<td>{100 * r.rank(k):.2f}</td>" for k in TABLE_RANKS)
        + f"<td>{100 * r.mAP:.2f}</td><td>{100 * r.mINP:.2f}</td><td>{r.num_valid}/{r.num_queries}</td></tr>"
        for name, r in results)
    sections = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(n)}</p>" for n in notes),
                f"<table><tr>{header}</tr>{rows}</table>", "<h2>CMC</h2>",
                cmc_svg({name: r.cmc for name, r in results})]
    for name, lists in (rank_lists or {}).items():
        sections.append(f"<h2>Rank lists: {html.escape(name)}</h2>")
        sections.extend(rank_list_html(rank_list, thumbnail_size) for rank_list in lists)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


def write_html_report(
    path: str | os.PathLike[str], title: str, results: Sequence[tuple[str, EvalResult]], *,
    rank_lists: Mapping[str, Sequence[RankList]] | None = None, notes: Sequence[str] = (),
    thumbnail_size: tuple[int, int] = (64, 128),
) -> Path:
    """Render :func:`render_html_report` and write it atomically; returns the path."""
    write_text_atomic(path, render_html_report(title, results, rank_lists=rank_lists, notes=notes,
                                               thumbnail_size=thumbnail_size))
    return Path(path)
