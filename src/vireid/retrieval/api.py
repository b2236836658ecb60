"""One entry point for the exact re-rankers: ``rerank(method, query_feat, gallery_feat, ...)``.

Every method is a pure function of the raw query and gallery features (normalised inside)
returning a dense Q×G distance, smaller = closer.  See ``docs/reranking.md`` for the methods,
the paper-vs-reference differences and the presets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vireid.errors import InputError
from vireid.retrieval.aim import aim
from vireid.retrieval.exact import block_rows, check_variant, l2_normalize, resolve_dtype
from vireid.retrieval.kreciprocal import krr
from vireid.retrieval.presets import get_method, resolve_params, resolve_variant
from vireid.retrieval.sim import mnnr, sgr, sim


def plain(query_feat: np.ndarray, gallery_feat: np.ndarray, *, variant: str = "reference",
          dtype: object = np.float32) -> np.ndarray:
    """AGW ``test.py``: ``−qᵀg`` of L2-normalised features (both variants are the same)."""
    check_variant(variant)
    dt = resolve_dtype(dtype)
    qn = l2_normalize(query_feat, dt, name="query features")
    gn = l2_normalize(gallery_feat, dt, name="gallery features")
    out = np.empty((len(qn), len(gn)), dtype=dt)
    for part in block_rows(len(qn), len(gn)):
        np.matmul(qn[part], gn.T, out=out[part])
        np.negative(out[part], out=out[part])
    return out


FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "plain": plain, "aim": aim, "sgr": sgr, "mnnr": mnnr, "sim": sim, "krr": krr,
}


@dataclass(frozen=True)
class RerankSettings:
    """A fully resolved re-ranking call: what a results JSON records."""

    method: str
    variant: str
    params: dict[str, int | float]
    preset: str | None
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "variant": self.variant, "preset": self.preset,
                "params": dict(self.params), "dtype": self.dtype}


def resolve_rerank(method: str, *, num_gallery: int | None = None, variant: str | None = None,
                   params: Mapping[str, object] | None = None, preset: str | None = None,
                   dtype: object = np.float32) -> RerankSettings:
    """Validate a method name, variant, preset and parameters (strings allowed, as from a CLI).

    Raises :class:`~vireid.errors.InputError` with one line naming the bad value.
    """
    spec = get_method(method)
    return RerankSettings(
        method=spec.name, variant=resolve_variant(spec, variant),
        params=resolve_params(spec, params, preset, num_gallery=num_gallery), preset=preset,
        dtype=resolve_dtype(dtype).name,
    )


def rerank(method: str, query_feat: np.ndarray, gallery_feat: np.ndarray, *, variant: str | None = None,
           params: Mapping[str, object] | None = None, preset: str | None = None,
           dtype: object = np.float32) -> np.ndarray:
    """Re-ranked Q×G distance (smaller = closer) of ``method`` in ``dtype``.

    ``variant``: ``reference`` (the public code, quirks included) or ``paper`` (the equations);
    default per method (reference for aim/krr, paper for sgr/mnnr/sim).  ``preset``
    (``sysu``, ``sysu-multishot``, ``sysu-indoor``, ``regdb``) fills in the papers' parameters;
    ``params`` override them.
    """
    query_shape, gallery_shape = np.shape(query_feat), np.shape(gallery_feat)
    if len(query_shape) != 2 or len(gallery_shape) != 2 or query_shape[1] != gallery_shape[1]:
        raise InputError(f"query and gallery features must be 2-D with one feature dimension, got shapes "
                         f"{query_shape} and {gallery_shape}")
    settings = resolve_rerank(method, num_gallery=gallery_shape[0], variant=variant, params=params,
                              preset=preset, dtype=dtype)
    return FUNCTIONS[settings.method](query_feat, gallery_feat, variant=settings.variant, dtype=dtype,
                                      **settings.params)
