"""An int8 scalar-quantised copy of the gallery: the first stage of a two-stage search.

A query's exact pass over G float32 features reads 4·G·d bytes (800 MB at G = 100,000,
d = 2048): memory-bound. Here every gallery value is stored as one signed byte, with one scale
per dimension (``code[i, j] = round(g[i, j] · s_j)``, ``s_j = 127 / max_i |g[i, j]|``, so
nothing is clipped), and the query is divided by the same scales, so that ``Σ_j (q_j / s_j) ·
code[i, j] ≈ q·g_i`` (faiss ``IndexScalarQuantizer`` with ``QT_8bit_direct_signed``, inner
product). faiss rounds the query to integers as well, so it is stretched to the same range first
(``round(t · q_j / s_j)``, ``max_j |t · q_j / s_j| = 127``): the scan is an int8·int8 dot
product over a quarter of the float32 bytes. Both roundings perturb similarities slightly
(each value moves by at most half a step, 1/254 of its dimension's range), so the items it ranks
first are re-scored exactly in float32 by the caller.
"""

from __future__ import annotations

import numpy as np

_BLOCK_ROWS = 8192  # rows encoded at a time (bounds the float32 temporary)


class QuantizedGallery:
    """Int8 codes of unit gallery rows; :meth:`candidates` returns approximate nearest items."""

    def __init__(self, feats: np.ndarray) -> None:
        import faiss

        count, dim = feats.shape
        peak = np.abs(feats).max(axis=0) if count else np.ones(dim, np.float32)
        self.scale = (127.0 / np.maximum(peak, 1e-12)).astype(np.float32)
        self._index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_direct_signed,
                                                 faiss.METRIC_INNER_PRODUCT)
        for start in range(0, count, _BLOCK_ROWS):
            block = feats[start:start + _BLOCK_ROWS] * self.scale
            self._index.add(np.clip(np.rint(block), -127.0, 127.0).astype(np.float32, copy=False))

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    def candidates(self, query: np.ndarray, k: int) -> np.ndarray:
        """Gallery rows of the ``k`` largest approximate similarities to one unit query, best
        first (all rows when ``k >= count``)."""
        import faiss

        k = min(k, self.count)
        scaled = query / self.scale
        scaled *= 127.0 / max(float(np.abs(scaled).max()), 1e-12)
        # faiss opens an OpenMP team even for one query; its idle members would spin beside the
        # one that scans. The thread count is this calling thread's setting: restore it after.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            _, rows = self._index.search(np.rint(scaled)[None].astype(np.float32), k)
        finally:
            faiss.omp_set_num_threads(threads)
        return rows[0][rows[0] >= 0]
