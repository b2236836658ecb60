"""SAAI affinity inference (AIM): Fang et al., "Visible-Infrared Person Re-Identification via
Semantic Alignment and Affinity Inference", ICCV 2023, Eq. 6–10.

Each image is re-described by its sparse affinity row to the gallery: its k1 strongest
similarities (the rest set to 0).  A gallery image's row is further averaged with the rows of
its k2 nearest gallery neighbours (itself included).  After L2 normalisation the cosine
similarity of the two affinity rows is added to the feature similarity.

Affinity rows are CSR (k1 entries per row), so ``G'`` holds about k1·k2 entries per row and
``Q'·G'ᵀ`` is a sparse product; the only dense arrays are blocks of the Gram matrices.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from vireid.retrieval.exact import (
    NORM_EPS, block_rows, check_variant, l2_normalize, resolve_dtype, self_top_k_neighbours, topk_largest,
)
from vireid.retrieval.kreciprocal import csr_rows, local_expansion


def aim(query_feat: np.ndarray, gallery_feat: np.ndarray, *, k1: int = 30, k2: int = 6, variant: str = "reference",
        dtype: object = np.float32) -> np.ndarray:
    """SAAI Eq. 6–10: ``−(Q'·G'ᵀ) − qᵀg`` with Q', G' the normalised sparse affinity rows.

    ``reference`` reproduces ``models/AIM.py``: a row keeps every value ≥ its k1-th largest
    (ties kept, so possibly more than k1 entries); ``paper`` keeps exactly the k1 largest
    (ties broken in ``torch.topk`` order).  ``k2 <= k1``.
    """
    check_variant(variant)
    dt = resolve_dtype(dtype)
    qn = l2_normalize(query_feat, dt, name="query features")
    gn = l2_normalize(gallery_feat, dt, name="gallery features")
    keep_ties = variant == "reference"
    gallery_rows, nearest = _affinity_rows(gn, k1, keep_ties=keep_ties, k2=k2)
    if k2 != 1:
        gallery_rows = local_expansion(gallery_rows, nearest)
    gallery_t = _normalize_rows(gallery_rows).T.tocsr()
    out = np.empty((len(qn), len(gn)), dtype=dt)
    for part in block_rows(len(qn), len(gn)):
        block = qn[part] @ gn.T
        query_rows = _normalize_rows(_threshold(block, *topk_largest(block, k1), keep_ties=keep_ties))
        affinity = (query_rows @ gallery_t).tocsr()
        view = out[part]
        np.negative(block, out=view)
        view[csr_rows(affinity), affinity.indices] -= affinity.data
    return out


def _affinity_rows(gn: np.ndarray, k1: int, *, keep_ties: bool, k2: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """SAAI Eq. 6: the sparse affinity rows of the gallery against itself and each row's top-k2 columns.

    The top-k1 lists come from :func:`self_top_k_neighbours` (half the Gram matrix); with
    ``keep_ties`` a row whose (k1+1)-th similarity equals its k1-th is recomputed in full, so
    every entry tied at the threshold is kept.
    """
    n = len(gn)
    graph = self_top_k_neighbours(gn, min(k1 + 1, n) if keep_ties else k1, self_first=False)
    values, index = graph.sim[:, :k1], graph.index[:, :k1]
    order = np.argsort(index, axis=1)
    rows = np.arange(n).repeat(k1)
    cols = np.take_along_axis(index, order, axis=1).ravel()
    data = np.take_along_axis(values, order, axis=1).ravel()
    tied = np.flatnonzero(graph.sim[:, -1] == graph.sim[:, k1 - 1]) if keep_ties and k1 < n else np.empty(0, int)
    if len(tied):
        block = gn[tied] @ gn.T
        redone = _threshold(block, *topk_largest(block, k1), keep_ties=True).tocoo()
        kept = ~np.isin(rows, tied)
        rows = np.concatenate([rows[kept], tied[redone.row]])
        cols = np.concatenate([cols[kept], redone.col])
        data = np.concatenate([data[kept], redone.data])
    matrix = sp.csr_matrix((data, (rows, cols)), shape=(n, n))
    matrix.sort_indices()
    return matrix, index[:, :k2]


def _threshold(block: np.ndarray, values: np.ndarray, index: np.ndarray, *, keep_ties: bool) -> sp.csr_matrix:
    """Keep each row's top-k1 entries (``values``, ``index`` from :func:`topk_largest`); ``keep_ties``:
    every entry ≥ the k1-th largest."""
    k1 = values.shape[1]
    if keep_ties:
        rows, cols = np.nonzero(block >= values[:, -1:])
        return sp.csr_matrix((block[rows, cols], (rows, cols)), shape=block.shape)
    order = np.argsort(index, axis=1)
    return sp.csr_matrix(
        (np.take_along_axis(values, order, axis=1).ravel(), np.take_along_axis(index, order, axis=1).ravel(),
         np.arange(0, block.shape[0] * k1 + 1, k1)), shape=block.shape)


def _normalize_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Row L2 normalisation ``x / max(‖x‖, 1e-12)`` of a CSR matrix (as ``F.normalize``)."""
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    scale = 1.0 / np.maximum(norms, NORM_EPS)
    return sp.csr_matrix(sp.diags(scale.astype(matrix.dtype)) @ matrix)
