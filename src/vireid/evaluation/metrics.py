"""CMC, mAP and mINP of query-to-gallery rankings, computed in query chunks.

Two inputs are supported:

* a dense distance matrix ``(Q, G)`` (smaller = closer), ranked chunk by chunk: peak extra
  memory is O(chunk x G), never a full Q x G argsort;
* ranked lists ``ranked_index (Q, K)`` of gallery rows (``-1`` pads short rows), where
  positives outside the list count as not retrieved: the AP denominator is the number of
  valid positives of the query in the whole gallery and such a query's INP is 0.

Protocols (:data:`PROTOCOLS`) differ in which gallery items are removed for a query and in
the CMC kind:

=========  ==============================================  ===============  ==========================
name       removed from a query's ranking                  CMC              reproduces
=========  ==============================================  ===============  ==========================
``sysu``   every cam-2 item, for cam-3 queries             identity-level   AGW ``eval_sysu``
``regdb``  nothing                                         image-level      AGW ``eval_regdb``
``llcm``   items with the query's identity *and* camera    identity-level   LLCM ``eval_llcm``
``market`` items with the query's identity *and* camera    image-level      Market-1501 / torchreid
=========  ==============================================  ===============  ==========================

*Image-level* CMC at rank k: a true match among the first k kept images. *Identity-level* CMC
at rank k: the query's identity among the first k distinct identities of the kept ranking
(the official SYSU-MM01 CMC; it equals image-level CMC at rank 1 only).

Conventions shared with the references: a query is *valid* iff its identity has at least one
kept gallery item; invalid queries are skipped (they count in ``num_queries`` but not in
``num_valid``); CMC counts are summed in float32 and divided by the number of valid queries;
AP = mean over positives of precision at the positive; INP = (#positives) / (rank of the last
positive) (mINP of Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook"). The CMC has
``min(max_rank, G)`` entries, as the references truncate it; a ranking with fewer than
``max_rank`` distinct identities saturates at its last value (the references fail there).

Ties: exactly equal distances are ordered by gallery row (a stable sort), so results are
deterministic. The references use NumPy's unstable default sort, so on exact ties their order
is arbitrary; without ties (e.g. the golden data) both agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from vireid.errors import InputError

MAX_RANK = 20
CHUNK_ELEMENTS = 1 << 18
"""Default chunk budget: the number of query rows per chunk is ``CHUNK_ELEMENTS // G``."""
SHALLOW_PREFIX = 64
"""Identity-level ranks of first matches before this position are computed on this prefix only."""

RemovalRule = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``remove(query_id, query_cam, gallery_id, gallery_cam) -> bool mask`` (broadcasting)."""


def _remove_sysu(q_id: np.ndarray, q_cam: np.ndarray, g_id: np.ndarray, g_cam: np.ndarray) -> np.ndarray:
    return (q_cam == 3) & (g_cam == 2)


def _remove_nothing(q_id: np.ndarray, q_cam: np.ndarray, g_id: np.ndarray, g_cam: np.ndarray) -> np.ndarray:
    return np.zeros(np.broadcast_shapes(q_id.shape, g_id.shape), dtype=bool)


def _remove_same_identity_and_camera(
    q_id: np.ndarray, q_cam: np.ndarray, g_id: np.ndarray, g_cam: np.ndarray,
) -> np.ndarray:
    return (g_id == q_id) & (g_cam == q_cam)


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: which gallery items a query ignores and which CMC it reports."""

    name: str
    cmc_kind: Literal["identity", "image"]
    removal: str
    reference: str
    remove: RemovalRule

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "cmc": self.cmc_kind, "removal": self.removal, "reference": self.reference}


PROTOCOLS: dict[str, Protocol] = {
    "sysu": Protocol("sysu", "identity", "cam-3 queries ignore all cam-2 gallery items (same location)",
                     "AGW eval_metrics.eval_sysu (= official SYSU-MM01 CMC/mAP)", _remove_sysu),
    "regdb": Protocol("regdb", "image", "nothing removed", "AGW eval_metrics.eval_regdb", _remove_nothing),
    "llcm": Protocol("llcm", "identity", "gallery items with the query's identity and camera are ignored",
                     "LLCM (ZYK100/LLCM) eval_metrics.eval_llcm", _remove_same_identity_and_camera),
    "market": Protocol("market", "image", "gallery items with the query's identity and camera are ignored",
                       "Market-1501 / torchreid eval_market1501", _remove_same_identity_and_camera),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name raises :class:`InputError` listing the valid ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise InputError(f"unknown protocol {name!r} (choose from {', '.join(PROTOCOLS)})") from None


@dataclass
class EvalResult:
    """Metrics of one ranking (fractions): ``cmc[k-1]`` is the CMC at rank k."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_queries: int
    num_valid: int

    @property
    def num_skipped(self) -> int:
        """Queries without a valid true match in the gallery (skipped, as the references do)."""
        return self.num_queries - self.num_valid

    def rank(self, k: int) -> float:
        """CMC at rank ``k`` (1-based); ranks past the CMC length take its last value."""
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "cmc": [float(x) for x in self.cmc], "mAP": float(self.mAP), "mINP": float(self.mINP),
            "num_queries": int(self.num_queries), "num_valid": int(self.num_valid),
            "num_skipped": int(self.num_skipped),
        }


@dataclass
class QueryScores:
    """Per-query outcome of a ranking.

    ``match_rank``: 1-based CMC rank of the first true match (identity- or image-level as the
    protocol says), ``NOT_FOUND`` when none is in the ranking; ``ap``/``inp`` are 0 for invalid
    queries; ``valid``: the query has at least one kept positive in the gallery.
    """

    match_rank: np.ndarray
    ap: np.ndarray
    inp: np.ndarray
    valid: np.ndarray
    num_gallery: int

    NOT_FOUND = np.iinfo(np.int64).max

    def summary(self, max_rank: int = MAX_RANK) -> EvalResult:
        """Aggregate as the references do (float32 CMC, float64 mean AP/INP over valid queries)."""
        num_valid = int(self.valid.sum())
        if num_valid == 0:
            raise InputError(
                f"no query has a true match in the gallery ({len(self.valid)} queries): check that "
                "query_id and gallery_id share identities and that the protocol's camera rule leaves some")
        max_rank = min(max_rank, self.num_gallery)
        ranks = self.match_rank[self.valid]
        counts = np.bincount(np.minimum(ranks, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
        cmc = np.cumsum(counts).astype(np.float32) / np.float32(num_valid)
        return EvalResult(
            cmc=cmc, mAP=float(np.mean(self.ap[self.valid])), mINP=float(np.mean(self.inp[self.valid])),
            num_queries=len(self.valid), num_valid=num_valid,
        )


def evaluate_distance(
    dist: np.ndarray, query_id: np.ndarray, gallery_id: np.ndarray, query_cam: np.ndarray,
    gallery_cam: np.ndarray, protocol: str | Protocol = "sysu", *, max_rank: int = MAX_RANK,
    chunk_size: int | None = None,
) -> EvalResult:
    """CMC / mAP / mINP of a dense ``(Q, G)`` distance matrix under ``protocol``."""
    return score_distance(dist, query_id, gallery_id, query_cam, gallery_cam, protocol,
                          chunk_size=chunk_size).summary(max_rank)


def evaluate_ranked(
    ranked_index: np.ndarray, query_id: np.ndarray, gallery_id: np.ndarray, query_cam: np.ndarray,
    gallery_cam: np.ndarray, protocol: str | Protocol = "sysu", *, max_rank: int = MAX_RANK,
    chunk_size: int | None = None,
) -> EvalResult:
    """CMC / mAP / mINP of ranked lists ``(Q, K)``; positives outside a list count as not retrieved."""
    return score_ranked(ranked_index, query_id, gallery_id, query_cam, gallery_cam, protocol,
                        chunk_size=chunk_size).summary(max_rank)


def score_distance(
    dist: np.ndarray, query_id: np.ndarray, gallery_id: np.ndarray, query_cam: np.ndarray,
    gallery_cam: np.ndarray, protocol: str | Protocol = "sysu", *, chunk_size: int | None = None,
) -> QueryScores:
    """Per-query scores of a dense distance matrix; ranks ``chunk_size`` query rows at a time."""
    rule = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
    if getattr(dist, "ndim", 0) != 2:
        raise InputError(f"distance matrix must be 2-D (Q, G), got shape {getattr(dist, 'shape', None)}")
    labels = _Labels.build(query_id, gallery_id, query_cam, gallery_cam, num_rows=dist.shape[0],
                           num_gallery=dist.shape[1], what="distance matrix")
    scores = _empty_scores(dist.shape[0], dist.shape[1])
    for start, stop in _chunks(dist.shape[0], dist.shape[1], chunk_size):
        block = np.asarray(dist[start:stop])
        if np.isnan(block).any():
            row, col = np.argwhere(np.isnan(block))[0]
            raise InputError(f"distance matrix has NaN at row {start + row}, column {col}")
        _score_ordered(stable_argsort(block), labels, rule, slice(start, stop), scores, num_positives=None)
    return scores


def score_ranked(
    ranked_index: np.ndarray, query_id: np.ndarray, gallery_id: np.ndarray, query_cam: np.ndarray,
    gallery_cam: np.ndarray, protocol: str | Protocol = "sysu", *, chunk_size: int | None = None,
) -> QueryScores:
    """Per-query scores of ranked lists of gallery rows (best first, ``-1`` = padding)."""
    rule = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
    ranked_index = validate_ranked_index(ranked_index, num_queries=len(query_id), num_gallery=len(gallery_id))
    labels = _Labels.build(query_id, gallery_id, query_cam, gallery_cam, num_rows=ranked_index.shape[0],
                           num_gallery=len(gallery_id), what="ranked_index")
    positives = count_kept_positives(labels.query_id, labels.gallery_id, labels.query_cam,
                                     labels.gallery_cam, rule)
    scores = _empty_scores(ranked_index.shape[0], len(gallery_id))
    for start, stop in _chunks(ranked_index.shape[0], max(ranked_index.shape[1], 1), chunk_size):
        _score_ordered(ranked_index[start:stop], labels, rule, slice(start, stop), scores,
                       num_positives=positives[start:stop])
    return scores


def validate_ranked_index(ranked_index: np.ndarray, *, num_queries: int, num_gallery: int) -> np.ndarray:
    """Check shape ``(Q, K)``, integer dtype, values in ``[-1, G)`` and no repeated row; return int64."""
    ranked_index = np.asarray(ranked_index)
    if ranked_index.ndim != 2 or not np.issubdtype(ranked_index.dtype, np.integer):
        raise InputError(f"ranked_index must be a 2-D integer array (Q, K), got {ranked_index.dtype} "
                         f"{ranked_index.shape}")
    if ranked_index.shape[0] != num_queries:
        raise InputError(f"ranked_index has {ranked_index.shape[0]} rows but there are {num_queries} queries")
    if ranked_index.size and (ranked_index.min() < -1 or ranked_index.max() >= num_gallery):
        raise InputError(f"ranked_index has values outside [-1, {num_gallery - 1}] (gallery rows)")
    ordered = np.sort(ranked_index, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row = int(np.argwhere(repeated)[0, 0])
        raise InputError(f"ranked_index row {row} lists a gallery row more than once")
    return ranked_index.astype(np.int64, copy=False)


def stable_argsort(block: np.ndarray) -> np.ndarray:
    """Row-wise argsort with ties ordered by column, at the speed of NumPy's default sort.

    float32 (and narrower) rows: one sort of int64 keys ``(order-preserving value bits, column)``,
    which is stable by construction. Other dtypes: the SIMD quicksort ranks every row and only
    rows that contain exactly equal values are re-sorted with the (slower) stable sort.
    """
    if block.dtype.kind == "f" and block.dtype.itemsize <= 4:
        values = np.ascontiguousarray(block, dtype=np.float32) + np.float32(0)  # -0.0 -> +0.0
        bits = values.view(np.int32)
        monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
        keys = (monotone.astype(np.int64) << 32) | np.arange(block.shape[1], dtype=np.int64)
        keys.sort(axis=1)
        return keys & 0xFFFFFFFF
    order = np.argsort(block, axis=1)
    ordered = np.take_along_axis(block, order, axis=1)
    tied = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    if tied.any():
        order[tied] = np.argsort(block[tied], axis=1, kind="stable")
    return order


def count_kept_positives(
    query_id: np.ndarray, gallery_id: np.ndarray, query_cam: np.ndarray, gallery_cam: np.ndarray,
    protocol: Protocol,
) -> np.ndarray:
    """Number of gallery items of each query's identity that the protocol keeps, in O((Q + G) log G + P).

    Only (query, same-identity gallery item) pairs are visited (P of them), never Q x G.
    """
    by_id = np.argsort(gallery_id, kind="stable")
    sorted_ids = gallery_id[by_id]
    first = np.searchsorted(sorted_ids, query_id, side="left")
    lengths = np.searchsorted(sorted_ids, query_id, side="right") - first
    pair_query = np.repeat(np.arange(len(query_id)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pair_gallery = by_id[np.repeat(first, lengths) + offsets]
    removed = protocol.remove(query_id[pair_query], query_cam[pair_query],
                              gallery_id[pair_gallery], gallery_cam[pair_gallery])
    return lengths - np.bincount(pair_query, weights=removed, minlength=len(query_id)).astype(np.int64)


def mean_result(results: Sequence[EvalResult]) -> EvalResult:
    """Mean over trials (CMC, mAP, mINP averaged in float64); query counts are totals over trials."""
    if not results:
        raise InputError("no trial results to average")
    length = min(len(r.cmc) for r in results)
    return EvalResult(
        cmc=np.mean([r.cmc[:length].astype(np.float64) for r in results], axis=0),
        mAP=float(np.mean([r.mAP for r in results])), mINP=float(np.mean([r.mINP for r in results])),
        num_queries=sum(r.num_queries for r in results), num_valid=sum(r.num_valid for r in results),
    )


@dataclass
class _Labels:
    query_id: np.ndarray
    gallery_id: np.ndarray
    query_cam: np.ndarray
    gallery_cam: np.ndarray
    gallery_code: np.ndarray
    num_codes: int

    @classmethod
    def build(cls, query_id: np.ndarray, gallery_id: np.ndarray, query_cam: np.ndarray,
              gallery_cam: np.ndarray, *, num_rows: int, num_gallery: int, what: str) -> "_Labels":
        arrays = {"query_id": query_id, "gallery_id": gallery_id, "query_cam": query_cam,
                  "gallery_cam": gallery_cam}
        expected = {"query_id": num_rows, "query_cam": num_rows, "gallery_id": num_gallery,
                    "gallery_cam": num_gallery}
        checked = {}
        for key, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"{key} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
            if len(arr) != expected[key]:
                side = "rows" if key.startswith("query") else "columns"
                raise InputError(f"{key} has {len(arr)} entries but the {what} has {expected[key]} {side}")
            checked[key] = arr.astype(np.int64, copy=False)
        if num_rows == 0 or num_gallery == 0:
            raise InputError(f"the {what} is empty ({num_rows} queries x {num_gallery} gallery items)")
        codes, gallery_code = np.unique(checked["gallery_id"], return_inverse=True)
        return cls(**checked, gallery_code=gallery_code.astype(np.int64), num_codes=len(codes))


def _empty_scores(num_queries: int, num_gallery: int) -> QueryScores:
    return QueryScores(
        match_rank=np.full(num_queries, QueryScores.NOT_FOUND, dtype=np.int64),
        ap=np.zeros(num_queries), inp=np.zeros(num_queries), valid=np.zeros(num_queries, dtype=bool),
        num_gallery=num_gallery,
    )


def _chunks(num_rows: int, row_length: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(row_length, 1))
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, num_rows)) for s in range(0, num_rows, chunk_size)]


def _score_ordered(
    order: np.ndarray, labels: _Labels, rule: Protocol, rows: slice, out: QueryScores,
    num_positives: np.ndarray | None,
) -> None:
    """Score a chunk of rankings ``order (C, K)`` (gallery rows, best first, -1 = padding) into ``out``.

    ``num_positives`` (kept positives in the whole gallery) defaults to those in the ranking,
    which is exact for full rankings.
    """
    q_id = labels.query_id[rows][:, None]
    q_cam = labels.query_cam[rows][:, None]
    present = order >= 0
    padded = not present.all()
    gallery_rows = np.where(present, order, 0) if padded else order
    g_id = labels.gallery_id[gallery_rows]
    keep = ~rule.remove(q_id, q_cam, g_id, labels.gallery_cam[gallery_rows])
    if padded:
        keep &= present
    match = keep & (g_id == q_id)
    kept_rank = np.cumsum(keep, axis=1, dtype=np.int32)  # 1-based rank at kept positions

    match_row, match_col = np.nonzero(match)
    num_hits = np.bincount(match_row, minlength=len(order))
    positives = num_hits if num_positives is None else num_positives
    hits_so_far = np.cumsum(match, axis=1, dtype=np.int32)[match_row, match_col]
    precision = hits_so_far / kept_rank[match_row, match_col]
    found = num_hits > 0
    ends = np.cumsum(num_hits)
    found_rows = np.flatnonzero(found)
    first_col = match_col[(ends - num_hits)[found]]
    last_rank = kept_rank[found_rows, match_col[ends[found] - 1]]

    valid = positives > 0
    ap = np.zeros(len(order))
    ap[valid] = np.bincount(match_row, weights=precision, minlength=len(order))[valid] / positives[valid]
    inp = np.zeros(len(order))
    complete = num_hits[found] == positives[found]
    inp[found_rows[complete]] = num_hits[found][complete] / last_rank[complete]

    match_rank = np.full(len(order), QueryScores.NOT_FOUND, dtype=np.int64)
    if rule.cmc_kind == "image":
        match_rank[found] = kept_rank[found_rows, first_col]
    else:
        match_rank[found] = _identity_ranks(order[found_rows], keep[found_rows], labels, first_col)

    out.match_rank[rows] = match_rank
    out.ap[rows] = ap
    out.inp[rows] = inp
    out.valid[rows] = valid


def _identity_ranks(order: np.ndarray, keep: np.ndarray, labels: _Labels, position: np.ndarray) -> np.ndarray:
    """Identity-level rank of ``order[i, position[i]]``: distinct kept identities in ``order[i, :position[i] + 1]``.

    Only the prefix up to the deepest requested position is examined; rows whose position is
    shallow (the usual case) are handled on a short prefix, the others on their own.
    """
    ranks = np.empty(len(position), dtype=np.int64)
    shallow = position < SHALLOW_PREFIX
    for rows in (np.flatnonzero(shallow), np.flatnonzero(~shallow)):
        if len(rows):
            width = int(position[rows].max()) + 1
            distinct = _distinct_identities_upto(order[rows, :width], keep[rows, :width], labels)
            ranks[rows] = distinct[np.arange(len(rows)), position[rows]]
    return ranks



def _distinct_identities_upto(order: np.ndarray, keep: np.ndarray, labels: _Labels) -> np.ndarray:
    """``(C, W)``: number of distinct kept identities among positions ``0..j`` of each ranking.

    Official SYSU CMC (``unique(..., 'stable')``): the identity rank of a position is this count
    at its first occurrence. First occurrences come from one row-wise sort of the keys
    ``identity code * W + position``.
    """
    width = order.shape[1]
    key_type = np.int32 if (labels.num_codes + 1) * width < 2**31 else np.int64
    codes = np.where(keep, labels.gallery_code[np.maximum(order, 0)], labels.num_codes)
    keys = codes.astype(key_type) * key_type(width) + np.arange(width, dtype=key_type)
    keys.sort(axis=1)
    sorted_codes = keys // key_type(width)
    first_of_identity = np.empty(keys.shape, dtype=bool)
    first_of_identity[:, 0] = True
    np.not_equal(sorted_codes[:, 1:], sorted_codes[:, :-1], out=first_of_identity[:, 1:])
    first_of_identity &= sorted_codes != labels.num_codes
    is_first = np.zeros(keys.shape, dtype=bool)
    np.put_along_axis(is_first, (keys - sorted_codes * key_type(width)).astype(np.intp), first_of_identity, axis=1)
    return np.cumsum(is_first, axis=1, dtype=np.int64)
