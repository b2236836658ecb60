"""Identity-clustered synthetic cross-modality features for re-ranking tests and benchmarks.

The feature model of the golden data (``tests/golden/README.md``), with ``s = (d/256)^(1/4)``:
identity centre ``c_k ~ N(0, I)``; visible image ``c_k + e``; infrared image
``c_k + o + u_k + e`` with a global offset ``o ~ N(0, (gap_global·s)²)``, a per-identity
offset ``u_k ~ N(0, (gap_identity·s)²)`` and noise ``e ~ N(0, (noise·s)²)``.  Queries are
infrared (cameras 3 and 6), the gallery visible (cameras 1, 2, 4, 5): SYSU-MM01's all-search
direction.

``intrinsic_dim=r`` draws every term in a random r-dimensional subspace (scaled by
``sqrt(d/r)`` to keep norms) plus isotropic noise of ``ambient_noise·s``: real embeddings
have a low intrinsic dimension, and approximate neighbour search depends on it.
Rows are generated in blocks from one ``numpy.random.Generator``, so a million-row gallery
never needs more than its own float32 array.
"""

from __future__ import annotations

import numpy as np

from vireid.errors import InputError
from vireid.features import FeatureSet

QUERY_CAMERAS = (3, 6)
GALLERY_CAMERAS = (1, 2, 4, 5)
_BLOCK_ROWS = 65536


def synthetic_features(num_query: int, num_gallery: int, dim: int, *, num_ids: int, seed: int = 0,
                       noise: float = 1.5, gap_global: float = 1.0, gap_identity: float = 4.0,
                       intrinsic_dim: int | None = None, ambient_noise: float = 0.1) -> FeatureSet:
    """A :class:`~vireid.features.FeatureSet` of float32 features; every query identity is in the gallery.

    Identities are assigned round-robin (gallery) and uniformly at random among the gallery's
    identities (queries), then each side is sorted by identity like the reference data loaders.
    """
    if min(num_query, num_gallery, dim, num_ids) < 1:
        raise InputError(f"sizes must be positive: queries={num_query}, gallery={num_gallery}, dim={dim}, "
                         f"ids={num_ids}")
    if num_ids > num_gallery:
        raise InputError(f"num_ids={num_ids} is larger than the gallery ({num_gallery})")
    if intrinsic_dim is not None and not 1 <= intrinsic_dim <= dim:
        raise InputError(f"intrinsic_dim={intrinsic_dim} must lie in [1, dim={dim}]")
    rng = np.random.default_rng(seed)
    scale = (dim / 256) ** 0.25
    rank = dim if intrinsic_dim is None else intrinsic_dim
    basis = None
    if intrinsic_dim is not None:
        basis, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
        basis = (basis.T * np.sqrt(dim / rank)).astype(np.float32)      # (r, d), rows of norm sqrt(d/r)
    centres = rng.standard_normal((num_ids, rank), dtype=np.float32)
    offset = rng.standard_normal(rank, dtype=np.float32) * np.float32(gap_global * scale)
    identity_offset = rng.standard_normal((num_ids, rank), dtype=np.float32) * np.float32(gap_identity * scale)
    gallery_id = np.sort(np.arange(num_gallery) % num_ids)
    query_id = np.sort(rng.integers(0, num_ids, num_query))

    def render(ids: np.ndarray, infrared: bool) -> np.ndarray:
        out = np.empty((len(ids), dim), dtype=np.float32)
        for start in range(0, len(ids), _BLOCK_ROWS):
            block_ids = ids[start:start + _BLOCK_ROWS]
            latent = centres[block_ids] + rng.standard_normal((len(block_ids), rank), dtype=np.float32) * np.float32(
                noise * scale)
            if infrared:
                latent += offset + identity_offset[block_ids]
            if basis is None:
                out[start:start + len(block_ids)] = latent
            else:
                out[start:start + len(block_ids)] = latent @ basis + rng.standard_normal(
                    (len(block_ids), dim), dtype=np.float32) * np.float32(ambient_noise * scale)
        return out

    gallery_feat = render(gallery_id, infrared=False)
    query_feat = render(query_id, infrared=True)
    return FeatureSet(
        query_feat=query_feat, gallery_feat=gallery_feat,
        query_id=query_id.astype(np.int64), gallery_id=gallery_id.astype(np.int64),
        query_cam=np.asarray(QUERY_CAMERAS, dtype=np.int64)[rng.integers(0, 2, num_query)],
        gallery_cam=np.asarray(GALLERY_CAMERAS, dtype=np.int64)[rng.integers(0, 4, num_gallery)],
        meta={"generator": "vireid.retrieval.synthetic.synthetic_features", "seed": seed, "dim": dim,
              "num_ids": num_ids, "noise": noise, "gap_global": gap_global, "gap_identity": gap_identity,
              "intrinsic_dim": intrinsic_dim, "ambient_noise": ambient_noise},
    )
