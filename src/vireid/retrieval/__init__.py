"""Retrieval: exact affinity re-ranking (plain, AIM, SGR, MNNR, SIM, k-reciprocal) and the
million-scale ranked-list mode (``knn``, ``graph``, ``ranked``).

``rerank(method, query_feat, gallery_feat, ...)`` is the entry point of the exact methods;
``METHODS`` describes their parameters and presets.
"""

from vireid.retrieval.api import FUNCTIONS, RerankSettings, plain, rerank, resolve_rerank
from vireid.retrieval.presets import METHODS, PRESETS, VARIANTS, MethodSpec, ParamSpec

__all__ = [
    "FUNCTIONS", "METHODS", "PRESETS", "VARIANTS", "MethodSpec", "ParamSpec", "RerankSettings", "plain",
    "rerank", "resolve_rerank",
]
