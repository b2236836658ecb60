"""The like-for-like benchmark harness (benchmarks/methods.py): variant files, claim statistics, cache keys."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from conftest import script_module
from vireid.errors import InputError


@pytest.fixture(scope="module")
def bench():
    with script_module("benchmarks/methods.py", "bench_methods") as module:
        yield module


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_repository_variant_files_parse_and_resolve(bench):
    recipe = bench.Recipe()
    variants, claims, by_file = bench.load_variants(bench.VARIANTS_DIR, recipe)
    assert by_file["baseline"] == ["baseline"]
    assert variants["baseline"].method == "baseline"
    for variant in variants.values():
        cfg = bench.resolve_config(variant, recipe, seed=1)
        assert cfg.model.method == variant.method
        # the common recipe reaches every variant unchanged
        assert (cfg.epochs, cfg.transforms.height, cfg.model.pooling, cfg.optim.lr, cfg.seed) == (
            recipe.epochs, recipe.height, "gem", recipe.lr, 1)
        assert cfg.transforms.channel_aug_prob == 0.0
        assert cfg.model.params["label_smoothing"] == recipe.label_smoothing


def test_variant_file_fields_and_placeholders(bench, tmp_path):
    path = write(tmp_path, "m.yaml", """
method: saai
source: test
common_overrides: ["model.params.image_size=[{height}, {width}]"]
variants:
  - name: full
    inference: [plain, aim]
  - name: no-lpd
    overrides: [model.params.diversity_weight=0]
claims:
  - {better: full/aim, worse: no-lpd/plain, metric: r1, source: T4}
""")
    recipe = dataclasses.replace(bench.Recipe(), height=48, width=24)
    variants, claims = bench.load_variant_file(path, recipe)
    assert [v.name for v in variants] == ["full", "no-lpd"]
    assert variants[0].overrides == ("model.params.image_size=[48, 24]",)
    assert variants[1].overrides == ("model.params.image_size=[48, 24]", "model.params.diversity_weight=0")
    assert variants[1].inference == ("plain",)  # default
    assert claims[0].better == ("full", "aim") and claims[0].worse == ("no-lpd", "plain") and claims[0].metric == "r1"
    cfg = bench.resolve_config(variants[1], recipe, seed=0)
    assert cfg.model.params["image_size"] == [48, 24] and cfg.model.params["diversity_weight"] == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("method: baseline\nvariants:\n  - name: a\n    overides: []\n", "unknown key 'variants[0].overides'"),
    ("method: baseline\nvarients: []\n", "unknown key 'varients'"),
    ("method: baseline\nvariants: [{name: a}]\nclaims: [{better: a/plain, worse: a/plain, metrc: r1}]\n",
     "unknown key 'claims[0].metrc'"),
    ("method: baseline\nvariants: [{name: a, overrides: [epochs=3]}]\n", "variants[0].overrides[0]: override 'epochs'"),
    ("method: baseline\nvariants: [{name: a, overrides: [transforms.channel_aug_prob=0.5]}]\n",
     "override 'transforms.channel_aug_prob' changes the common recipe"),
    ("method: baseline\ncommon_overrides: ['model.params.label_smoothing=0']\nvariants: [{name: a}]\n",
     "common_overrides[0]: override 'model.params.label_smoothing'"),
    ("method: baseline\nvariants: [{name: a, inference: [plane]}]\n", "variants[0].inference[0]: unknown inference 'plane'"),
    ("method: baseline\nvariants: [{name: a, inference: [xiv-eq2]}]\n", "'xiv-eq2' needs a xiv model"),
    ("method: baseline\nvariants: [{name: a, overrides: ['model.params.x={heigth}']}]\n", "unknown placeholder {heigth}"),
    ("method: baseline\nvariants: [{name: a}]\nclaims: [{better: a, worse: a/plain}]\n", "claims[0].better"),
    ("variants: [{name: a}]\n", "key 'method' is required"),
])
def test_bad_variant_file_is_a_one_line_error_naming_file_and_key(bench, tmp_path, text, expected):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(InputError) as info:
        bench.load_variant_file(path, bench.Recipe())
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_unknown_method_parameter_names_file_and_variant(bench, tmp_path):
    path = write(tmp_path, "m.yaml", "method: baseline\nvariants: [{name: a, overrides: [model.params.tripplet=none]}]\n")
    variants, _ = bench.load_variant_file(path, bench.Recipe())
    with pytest.raises(InputError, match=r"m\.yaml: variant a: .*unknown key 'model\.params\.tripplet'"):
        bench.resolve_config(variants[0], bench.Recipe(), seed=0)


def test_claims_must_point_at_listed_variants_and_inference(bench, tmp_path):
    write(tmp_path, "a.yaml", "method: baseline\nvariants: [{name: a}]\n")
    write(tmp_path, "b.yaml", "method: baseline\nvariants: [{name: b}]\nclaims: [{better: b/aim, worse: a/plain}]\n")
    with pytest.raises(InputError, match=r"b\.yaml: claim better b/aim: variant 'b' does not list inference 'aim'"):
        bench.load_variants(tmp_path, bench.Recipe())
    write(tmp_path, "b.yaml", "method: baseline\nvariants: [{name: a}]\n")
    with pytest.raises(InputError, match=r"b\.yaml: variant name 'a' is also used in .*a\.yaml"):
        bench.load_variants(tmp_path, bench.Recipe())


def test_claim_statistics_hand_worked(bench):
    # deltas 2, 3, 4: mean 3, sample std 1, t = 3 / (1 / sqrt 3) = 5.196 > t_0.95(2) = 2.920
    stats = bench.claim_statistics({0: 50.0, 1: 52.0, 2: 55.0, 7: 1.0}, {0: 48.0, 1: 49.0, 2: 51.0})
    assert stats["seeds"] == [0, 1, 2] and stats["deltas"] == [2.0, 3.0, 4.0]
    assert stats["mean"] == pytest.approx(3.0) and stats["std"] == pytest.approx(1.0)
    assert stats["t"] == pytest.approx(3 * math.sqrt(3)) and stats["held"] == 3 and stats["n"] == 3
    assert stats["verdict"] == "reproduced"
    assert bench.t_critical(3) == pytest.approx(2.920, abs=1e-3)
    # deltas 1, -1, 3: mean 1, std 2, t = 0.866: direction in 2 of 3 seeds, within noise
    stats = bench.claim_statistics({0: 11.0, 1: 9.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert (stats["mean"], stats["std"], stats["held"]) == (pytest.approx(1.0), pytest.approx(2.0), 2)
    assert stats["verdict"] == "within noise"
    # deltas -2, -3, -4: the opposite direction, significant
    stats = bench.claim_statistics({0: 48.0, 1: 49.0, 2: 51.0}, {0: 50.0, 1: 52.0, 2: 55.0})
    assert stats["mean"] == pytest.approx(-3.0) and stats["held"] == 0 and stats["verdict"] == "not reproduced"
    # one seed: no spread, no verdict beyond noise; no common seed: not run
    assert bench.claim_statistics({0: 60.0}, {0: 40.0})["verdict"] == "within noise"
    assert bench.claim_statistics({0: 60.0}, {1: 40.0})["verdict"] == "not run"


def test_cache_key_follows_config_seed_and_code_not_paths(bench, tmp_path):
    path = write(tmp_path, "m.yaml", """
method: baseline
variants:
  - {name: a, overrides: [model.params.triplet=weighted]}
  - {name: b, overrides: [model.params.triplet=batch_hard]}
  - {name: c, overrides: [model.params.triplet=weighted]}
""")
    recipe = bench.Recipe()
    (a, b, c), _ = bench.load_variant_file(path, recipe)

    def key(variant, seed=0, r=recipe, root="DATA"):
        cfg = bench.resolve_config(variant, r, seed, root)
        return bench._digest(bench.training_key_material(cfg, r.synth()))

    base = key(a)
    assert key(c) == base                       # same resolved config: shared, whatever the variant's name
    assert key(a, root="/elsewhere") == base    # where the data lives is not what was trained
    assert key(a, r=dataclasses.replace(recipe, threads=1)) == base
    assert key(b) != base                       # a variant override
    assert key(a, seed=1) != base               # the seed
    assert key(a, r=dataclasses.replace(recipe, lr=1e-3)) != base   # a recipe value
    assert key(a, r=dataclasses.replace(recipe, difficulty="default")) != base  # the data
    assert bench.evaluation_key(base, "plain") != bench.evaluation_key(base, "aim")


def test_code_hash_covers_the_method_module_only(bench):
    files = {p.name for p in bench.source_closure(["vireid.engine.trainer", "vireid.models.methods.baseline"])}
    assert {"trainer.py", "baseline.py", "triplet.py", "backbone.py"} <= files
    assert not {"ssft.py", "saai.py", "xiv.py", "df2am.py"} & files
    assert "ssft.py" in {p.name for p in bench.source_closure(["vireid.models.methods.ssft"])}


def test_help_and_dry_run(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    assert "--seeds" in capsys.readouterr().out
    write(tmp_path, "baseline.yaml", "method: baseline\nvariants: [{name: baseline}]\n")
    assert bench.main(["--variants-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--dry-run", "--seeds", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "baseline seed 0: to train" in out and "baseline seed 1: to train" in out
    write(tmp_path, "baseline.yaml", "method: baseline\nvariants: [{name: baseline, overrides: [epochs=1]}]\n")
    assert bench.main(["--variants-dir", str(tmp_path), "--dry-run"]) == 2
    assert "override 'epochs' changes the common recipe" in capsys.readouterr().err


def test_selection_runs_what_the_selected_claims_compare_against(bench, tmp_path):
    write(tmp_path, "baseline.yaml", "method: baseline\nvariants: [{name: baseline}]\n")
    write(tmp_path, "m.yaml", "method: baseline\nvariants: [{name: m, inference: [plain, aim]}, {name: m2}]\n"
          "claims: [{better: m/aim, worse: baseline/plain}, {better: m/plain, worse: m2/plain}]\n")
    recipe = bench.Recipe()
    loaded = bench.load_variants(tmp_path, recipe)

    def select(*argv):
        args = bench.parse_args(["--variants-dir", str(tmp_path), *argv])
        names, claims = bench.select_variants(args, *loaded)
        return names, [(c.better[0], c.worse[0]) for c in claims]

    assert select("--methods", "baseline") == (["baseline"], [])
    assert select("--methods", "m") == (["m", "m2", "baseline"], [("m", "baseline"), ("m", "m2")])
    assert select("--variants", "m", "m2") == (["m", "m2"], [("m", "m2")])
    assert select() == (["baseline", "m", "m2"], [("m", "baseline"), ("m", "m2")])
    with pytest.raises(InputError, match="--methods: no variant file nope"):
        select("--methods", "nope")
