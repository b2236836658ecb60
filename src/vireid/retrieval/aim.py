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
    NORM_EPS, block_rows, check_variant, l2_normalize, resolve_dtype, topk_largest,
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
    gallery_rows, nearest = _affinity_rows(gn, gn, k1, keep_ties=keep_ties, k2=k2)
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


def _affinity_rows(rows: np.ndarray, columns: np.ndarray, k1: int, *, keep_ties: bool,
                   k2: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """SAAI Eq. 6: the sparse affinity rows of ``rows`` against ``columns`` and each row's top-k2 columns."""
    parts = []
    nearest = np.empty((len(rows), k2), dtype=np.int64)
    for part in block_rows(len(rows), len(columns)):
        block = rows[part] @ columns.T
        values, index = topk_largest(block, k1)
        nearest[part] = index[:, :k2]
        parts.append(_threshold(block, values, index, keep_ties=keep_ties))
    return sp.vstack(parts, format="csr"), nearest


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
