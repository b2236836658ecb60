"""The reference variants reproduce every golden ``dist_*`` (float64, <= 1e-9, on the stored rows) and its
metrics (on the whole matrix)."""

from __future__ import annotations

import numpy as np
import pytest

from vireid.evaluation.metrics import evaluate_distance
from vireid.retrieval import rerank

# golden key -> (method, params); the rest of each method's parameters come from the set's preset
SYSU = {
    "plain": ("plain", {}), "aim_4_1": ("aim", {"k1": 4, "k2": 1}), "aim_20_6": ("aim", {"k1": 20, "k2": 6}),
    "sgr": ("sgr", {}), "mnnr": ("mnnr", {}), "sim": ("sim", {}), "krr": ("krr", {}),
}
REGDB = {
    "plain": ("plain", {}), "aim_8_2": ("aim", {"k1": 8, "k2": 2}), "sgr": ("sgr", {}), "mnnr": ("mnnr", {}),
    "sim": ("sim", {}), "krr": ("krr", {}),
}
CASES = [("sysu", key) for key in SYSU] + [("regdb", key) for key in REGDB]


@pytest.fixture(scope="module")
def golden(sysu_golden: dict[str, np.ndarray], regdb_golden: dict[str, np.ndarray]) -> dict[str, dict]:
    return {"sysu": sysu_golden, "regdb": regdb_golden}


def _reference(data: dict[str, np.ndarray], protocol: str, key: str, dtype: type) -> np.ndarray:
    method, params = (SYSU if protocol == "sysu" else REGDB)[key]
    return rerank(method, data["query_feat"], data["gallery_feat"], variant="reference", preset=protocol,
                  params=params, dtype=dtype)


def test_every_golden_distance_is_covered(golden: dict[str, dict]) -> None:
    for protocol, table in (("sysu", SYSU), ("regdb", REGDB)):
        keys = {k[len("dist_"):] for k in golden[protocol] if k.startswith("dist_")}
        assert keys == set(table)


@pytest.mark.parametrize(("protocol", "key"), CASES)
def test_reference_variant_reproduces_golden_distance_and_metrics(golden: dict[str, dict], protocol: str,
                                                                  key: str) -> None:
    data = golden[protocol]
    dist = _reference(data, protocol, key, np.float64)
    assert dist.dtype == np.float64
    assert np.abs(dist[data["rows"]] - data[f"dist_{key}"]).max() <= 1e-9
    result = evaluate_distance(dist, data["query_id"], data["gallery_id"], data["query_cam"], data["gallery_cam"],
                               protocol)
    np.testing.assert_allclose(result.cmc, data[f"cmc_{key}"], rtol=0, atol=1e-6)
    assert result.mAP == pytest.approx(float(data[f"mAP_{key}"]), abs=1e-12)
    assert result.mINP == pytest.approx(float(data[f"mINP_{key}"]), abs=1e-12)


@pytest.mark.parametrize(("protocol", "key"), CASES)
def test_float32_default_is_within_float32_rounding(golden: dict[str, dict], protocol: str, key: str) -> None:
    data = golden[protocol]
    dist = _reference(data, protocol, key, np.float32)
    assert dist.dtype == np.float32
    assert np.abs(dist[data["rows"]] - data[f"dist_{key}"]).max() <= 1e-6
