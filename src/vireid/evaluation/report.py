"""Presenting results: a percent table for the terminal, the JSON result, and an HTML report.

Numbers are fractions everywhere except in the printed table and the HTML table (percent).
The HTML report is one self-contained file that works offline: plotly.js is embedded once, the
CMC curves are a plotly figure (its JSON in ``<script type="application/json" id="cmc-figure">``),
and the rank lists' images are embedded as JPEG data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vireid.errors import InputError
from vireid.evaluation.evaluator import ProtocolEvaluation, plain_distance
from vireid.evaluation.metrics import EvalResult, Protocol, stable_argsort
from vireid.features import FeatureSet
from vireid.io import write_json_atomic, write_text_atomic
from vireid.retrieval import rerank

TABLE_RANKS = (1, 5, 10, 20)
CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#7f7f7f", "#bcbd22")
CURVE_MARKERS = ("circle", "square", "diamond", "triangle-up", "x", "triangle-down", "star", "cross",
                 "pentagon", "hexagon")
CURVE_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
CMC_RANKS_SHOWN = 20
"""Ranks the CMC plot shows at first (zoom or pan to see more)."""
REPORT_QUERIES = 6
"""Queries with rank lists in a report (drawn with a seed)."""
REPORT_TOP = 10
"""Gallery items per rank list."""


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
    """One query's top gallery items (best first) under one method, for the HTML report.

    Paths are ``None`` where the feature file has no image paths; such tiles show no thumbnail.
    """

    query_row: int
    query_id: int
    query_cam: int
    query_path: str | None
    gallery_ids: list[int]
    gallery_cams: list[int]
    gallery_paths: list[str | None]
    distances: list[float]

    @property
    def matches(self) -> list[bool]:
        return [gid == self.query_id for gid in self.gallery_ids]


TrialDistance = Callable[[int], np.ndarray]
"""The (Q_t, G_t) distance of trial ``t`` of a feature set (smaller = closer)."""


def top_rank_lists(
    dist: np.ndarray, query_id: np.ndarray, gallery_id: np.ndarray, query_cam: np.ndarray, gallery_cam: np.ndarray,
    protocol: Protocol, query_rows: Sequence[int], *, query_paths: Sequence[str | None] | None = None,
    gallery_paths: Sequence[str | None] | None = None, top: int = REPORT_TOP,
) -> list[RankList]:
    """The ``top`` kept gallery items of each query in ``query_rows`` under ``protocol`` (ties by gallery row)."""
    lists = []
    for row in query_rows:
        distances = np.asarray(dist[row], dtype=np.float64).copy()
        removed = protocol.remove(query_id[row], query_cam[row], gallery_id, gallery_cam)
        distances[removed] = np.inf
        order = stable_argsort(distances[None, :])[0]
        order = order[~removed[order]][:top]
        lists.append(RankList(
            int(row), int(query_id[row]), int(query_cam[row]), None if query_paths is None else query_paths[row],
            [int(gallery_id[g]) for g in order], [int(gallery_cam[g]) for g in order],
            [None if gallery_paths is None else gallery_paths[g] for g in order],
            [float(distances[g]) for g in order]))
    return lists


def image_paths(features: FeatureSet, side: str, image_root: str | os.PathLike[str] | None = None) -> list[str] | None:
    """``features.extras[side + '_path']`` (``None`` when absent), relative paths joined to ``image_root``."""
    paths = features.extras.get(f"{side}_path")
    if paths is None:
        return None
    return [str(Path(image_root) / str(p)) if image_root is not None else str(p) for p in paths]


def feature_rank_lists(
    features: FeatureSet, dist: np.ndarray, protocol: Protocol, *, count: int = REPORT_QUERIES, seed: int = 0,
    top: int = REPORT_TOP, image_root: str | os.PathLike[str] | None = None,
) -> list[RankList]:
    """Rank lists of ``count`` seeded queries of a single-trial feature set; ``dist`` is its (Q, G) distance.

    Image paths come from ``features.extras`` ``query_path`` / ``gallery_path`` when present
    (relative ones joined to ``image_root``); without them the lists carry no paths.
    """
    expected = (len(features.query_id), len(features.gallery_id))
    if dist.shape != expected:
        raise InputError(f"rank lists: the distance has shape {dist.shape}, expected (Q, G) = {expected}")
    rows = select_queries(len(features.query_id), count, seed)
    return top_rank_lists(dist, features.query_id, features.gallery_id, features.query_cam, features.gallery_cam,
                          protocol, rows, query_paths=image_paths(features, "query", image_root),
                          gallery_paths=image_paths(features, "gallery", image_root), top=top)


def method_rank_lists(
    features: FeatureSet, distances: Mapping[str, TrialDistance], protocol: Protocol, *, trial: int = 0,
    count: int = REPORT_QUERIES, seed: int = 0, top: int = REPORT_TOP,
    image_root: str | os.PathLike[str] | None = None,
) -> dict[str, list[RankList]]:
    """Rank lists of the same seeded queries of trial ``trial`` under each method (one distance in memory at a time)."""
    rows = features.trial(trial)
    return {name: feature_rank_lists(rows, distance(trial), protocol, count=count, seed=seed, top=top,
                                     image_root=image_root)
            for name, distance in distances.items()}


def recorded_distance(features: FeatureSet, distance_info: Mapping[str, Any]) -> TrialDistance:
    """The trial distance that an evaluation's ``distance`` record describes: ``plain`` (negative
    cosine in its dtype) or a re-ranking (method, variant, parameters, dtype)."""
    method = distance_info.get("method")
    if "variant" in distance_info and "params" in distance_info:
        def reranked(t: int) -> np.ndarray:
            trial = features.trial(t)
            return rerank(str(method), trial.query_feat, trial.gallery_feat, variant=distance_info["variant"],
                          params=distance_info["params"], dtype=distance_info.get("dtype", "float32"))
        return reranked
    if method == "plain":
        def plain(t: int) -> np.ndarray:
            trial = features.trial(t)
            dtype = np.dtype(distance_info.get("dtype", "float32"))
            return plain_distance(trial.query_feat, trial.gallery_feat, dtype=dtype)
        return plain
    raise InputError(f"distance method {method!r}: cannot be recomputed for rank lists")


def select_queries(num_queries: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct query rows drawn with ``numpy.random.default_rng(seed)``, ascending."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_queries, size=min(count, num_queries), replace=False))


def thumbnail_data_uri(path: str | os.PathLike[str], size: tuple[int, int] = (128, 256), quality: int = 85) -> str:
    """A ``data:image/jpeg;base64,...`` URI of the image at ``path`` fitted into ``size`` (width, height)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail(size)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputError(f"{path}: cannot read image for the report ({exc})") from None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def cmc_figure(results: Sequence[tuple[str, EvalResult]], ranks_shown: int = CMC_RANKS_SHOWN) -> Any:
    """A plotly figure of the CMC curves: one trace per method (fractions, rank 1 first), each with
    its own colour, marker and dash. Each trace is drawn over the ones before it with a thinner line
    and smaller markers, so curves that coincide stay visible as nested strokes."""
    import plotly.graph_objects as go

    if not results:
        raise InputError("no CMC curve to plot")
    figure = go.Figure()
    longest = max(len(r.cmc) for _, r in results)
    for i, (name, result) in enumerate(results):
        figure.add_trace(go.Scatter(
            x=list(range(1, len(result.cmc) + 1)), y=[float(v) for v in result.cmc], name=name,
            mode="lines+markers",
            line={"color": CURVE_COLOURS[i % len(CURVE_COLOURS)], "dash": CURVE_DASHES[i % len(CURVE_DASHES)],
                  "width": max(5.0 - 1.0 * i, 2.0)},
            marker={"symbol": CURVE_MARKERS[i % len(CURVE_MARKERS)], "size": max(13 - 2 * i, 8),
                    "line": {"width": 1, "color": "white"}},
            hovertemplate="<b>%{fullData.name}</b><br>rank %{x}<br>CMC %{y:.2%}<extra></extra>"))
    shown = min(ranks_shown, longest)
    figure.update_layout(
        template="plotly_white", height=520, margin={"l": 70, "r": 20, "t": 30, "b": 40},
        xaxis={"title": {"text": "rank"}, "range": [0.5, shown + 0.5], "dtick": 1 if shown <= 20 else None,
               "zeroline": False},
        yaxis={"title": {"text": "CMC (matching rate)"}, "tickformat": ".0%", "rangemode": "normal"},
        legend={"orientation": "h", "yanchor": "top", "y": -0.14, "xanchor": "left", "x": 0,
                "traceorder": "normal"},
        hovermode="closest", dragmode="zoom")
    return figure


def _figure_script(figure: Any) -> str:
    """The figure's JSON in a data script, and the call that draws it into ``#cmc-plot``."""
    payload = json.loads(figure.to_json())
    payload["config"] = {"displaylogo": False, "responsive": True, "showLink": False,
                         "toImageButtonOptions": {"filename": "cmc"}}
    data = json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")
    return (f'<script type="application/json" id="cmc-figure">{data}</script>'
            '<script>(function(){var f=JSON.parse(document.getElementById("cmc-figure").textContent);'
            'Plotly.newPlot("cmc-plot",f.data,f.layout,f.config);})();</script>')


def _metric_table(results: Sequence[tuple[str, EvalResult]]) -> str:
    longest = max(len(r.cmc) for _, r in results)
    ranks = [k for k in TABLE_RANKS if k <= longest]
    header = "".join(f"<th>{h}</th>" for h in ["method", *(f"R{k}" for k in ranks), "mAP", "mINP", "valid/queries"])
    rows = "".join(
        f'<tr data-method="{html.escape(name)}"><td>{html.escape(name)}</td>'
        + "".join(f"<td>{100 * r.rank(k):.2f}</td>" for k in ranks)
        + f"<td>{100 * r.mAP:.2f}</td><td>{100 * r.mINP:.2f}</td><td>{r.num_valid}/{r.num_queries}</td></tr>"
        for name, r in results)
    return f'<table class="metrics"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>'


class _Thumbnails:
    """Data URIs of images, each read once per report; ``None`` (with the reason) where unreadable."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.cache: dict[str, tuple[str | None, str]] = {}

    def __call__(self, path: str | None) -> tuple[str | None, str]:
        if path is None:
            return None, "no image path in the feature file"
        if path not in self.cache:
            try:
                self.cache[path] = thumbnail_data_uri(path, self.size), path
            except InputError as exc:
                self.cache[path] = None, str(exc)
        return self.cache[path]


def _picture(thumbnails: _Thumbnails, path: str | None, alt: str) -> str:
    uri, about = thumbnails(path)
    if uri is None:
        return f'<div class="noimg" title="{html.escape(about)}">no image</div>'
    return f'<img src="{uri}" alt="{html.escape(alt)}" title="{html.escape(about)}">'


def _rank_list_blocks(rank_lists: Mapping[str, Sequence[RankList]], thumbnails: _Thumbnails) -> list[str]:
    """One block per query: the query, then a row of tiles per method (same queries for every method)."""
    names = list(rank_lists)
    counts = {len(rank_lists[name]) for name in names}
    if len(counts) > 1:
        raise InputError(f"rank lists of different queries per method: {', '.join(map(str, sorted(counts)))}")
    blocks = []
    for i in range(counts.pop() if counts else 0):
        first = rank_lists[names[0]][i]
        if any(rank_lists[name][i].query_row != first.query_row for name in names):
            raise InputError(f"rank lists of different queries per method at position {i}")
        rows = []
        for name in names:
            rank_list = rank_lists[name][i]
            tiles = "".join(
                f'<li class="tile {"match" if match else "miss"}" data-rank="{rank}" data-gallery-id="{gid}" '
                f'data-camera="{cam}">{_picture(thumbnails, path, f"rank {rank}")}'
                f'<span class="rank">{rank}. id {gid}</span><span>cam {cam}</span><span>d {dist:.4g}</span></li>'
                for rank, (path, gid, cam, dist, match) in enumerate(zip(
                    rank_list.gallery_paths, rank_list.gallery_ids, rank_list.gallery_cams, rank_list.distances,
                    rank_list.matches), start=1))
            rows.append(f'<div class="method-row" data-method="{html.escape(name)}">'
                        f'<div class="method-name">{html.escape(name)}</div><ol class="tiles">{tiles}</ol></div>')
        blocks.append(
            f'<section class="query-block" data-query-row="{first.query_row}">'
            f'<figure class="query">{_picture(thumbnails, first.query_path, "query")}'
            f'<figcaption><b>query</b><span>id {first.query_id}</span><span>cam {first.query_cam}</span>'
            f'</figcaption></figure><div class="method-rows">{"".join(rows)}</div></section>')
    return blocks


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;font-size:15px}
h1{font-size:22px}h2{font-size:19px;margin-top:28px}.note{color:#444;max-width:1100px}
.cmc{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
#cmc-plot{flex:1 1 640px;min-width:480px;max-width:900px;height:520px}
table.metrics{border-collapse:collapse;font-size:14px;flex:0 1 auto}
.metrics td,.metrics th{border:1px solid #ccc;padding:5px 10px;text-align:right}
.metrics td:first-child,.metrics th:first-child{text-align:left}.metrics th{background:#f3f3f3}
.query-block{display:flex;gap:16px;align-items:flex-start;padding:12px 0;border-top:1px solid #ddd}
.query{margin:0;text-align:center;font-size:13px;width:84px;flex:none}
.query img,.query .noimg{border:3px solid #333}
figcaption b,figcaption span,.tile span{display:block;line-height:1.3}
.method-rows{display:flex;flex-direction:column;gap:10px}
.method-row{display:flex;gap:10px;align-items:flex-start}
.method-name{width:150px;flex:none;font-size:13px;font-weight:600;padding-top:50px;word-wrap:break-word}
.tiles{display:flex;gap:6px;list-style:none;margin:0;padding:0}
.tile{width:76px;text-align:center;font-size:12px}
.tile img,.tile .noimg,.query img,.query .noimg{display:block;width:64px;height:128px;object-fit:contain;
margin:0 auto 3px;background:#f4f4f4}
.noimg{box-sizing:content-box;line-height:128px;font-size:11px;color:#777}
.tile img,.tile .noimg{border:4px solid transparent}
.match img,.match .noimg{border-color:#2ca02c}.miss img,.miss .noimg{border-color:#d62728}
.match .rank{color:#1b7a1b;font-weight:600}.miss .rank{color:#b01c1c;font-weight:600}
"""


def render_html_report(
    title: str, results: Sequence[tuple[str, EvalResult]], *,
    rank_lists: Mapping[str, Sequence[RankList]] | None = None, notes: Sequence[str] = (), rank_list_note: str = "",
    thumbnail_size: tuple[int, int] = (128, 256),
) -> str:
    """The report page: notes; CMC curves (plotly, zoomable, values on hover) beside the metric
    table (percent); rank lists per query, one row per method (tiles 64×128 px with identity,
    camera and distance, framed green for the query's identity and red otherwise).

    ``rank_lists`` maps a method's name to its lists of the same queries in the same order; an
    image that is absent or unreadable gives a tile without a thumbnail. ``thumbnail_size``: the
    stored resolution of each embedded image (shown at 64×128 px; twice that stays sharp on
    high-density screens).
    """
    from plotly.offline import get_plotlyjs

    sections = [f"<h1>{html.escape(title)}</h1>", *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
                "<h2>CMC</h2>", f'<div class="cmc"><div id="cmc-plot"></div>{_metric_table(results)}</div>',
                _figure_script(cmc_figure(results))]
    if rank_lists:
        sections.append("<h2>Rank lists</h2>")
        sections.append(f'<p class="note">{html.escape(rank_list_note)} Each row shows the top '
                        f'{max(len(lst.gallery_ids) for lists in rank_lists.values() for lst in lists)} gallery '
                        "images of one method, best first, with identity, camera and distance; a green frame marks "
                        "the query's identity, a red frame another identity.</p>")
        sections.extend(_rank_list_blocks(rank_lists, _Thumbnails(thumbnail_size)))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_STYLE}</style><script id="plotly-js">{get_plotlyjs()}</script></head>'
            f"<body>{''.join(sections)}</body></html>\n")


def write_html_report(
    path: str | os.PathLike[str], title: str, results: Sequence[tuple[str, EvalResult]], *,
    rank_lists: Mapping[str, Sequence[RankList]] | None = None, notes: Sequence[str] = (), rank_list_note: str = "",
    thumbnail_size: tuple[int, int] = (128, 256),
) -> Path:
    """Render :func:`render_html_report` and write it atomically; returns the path."""
    write_text_atomic(path, render_html_report(title, results, rank_lists=rank_lists, notes=notes,
                                               rank_list_note=rank_list_note, thumbnail_size=thumbnail_size))
    return Path(path)
