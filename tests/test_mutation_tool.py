"""tools/mutation.py: mutant-to-file mapping, equivalence list, numba-kernel exclusion, scores (mutmut itself is not run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import script_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    with script_module("tools/mutation.py", "mutation_tool") as module:
        yield module


def test_every_source_file_of_the_three_packages_is_mapped_to_existing_tests(tool):
    for folder in tool.PACKAGES.values():
        for path in (REPO / folder).glob("*.py"):
            assert str(path.relative_to(REPO)) in tool.MAPPING, path
    for tests in tool.MAPPING.values():
        assert all((REPO / t).is_file() for t in tests), tests
    groups = tool.all_groups()
    assert sorted(rel for members in groups.values() for rel in members) == sorted(tool.MAPPING)


def test_mutant_names_map_to_their_files(tool):
    files = list(tool.MAPPING)
    assert tool.file_of("vireid.losses.triplet.x_batch_hard_triplet_loss__mutmut_3", files) == "src/vireid/losses/triplet.py"
    assert tool.file_of("vireid.retrieval.xǁNeighbourǁmethod__mutmut_1", files) == "src/vireid/retrieval/__init__.py"
    assert tool.file_of("vireid.models.methods.ssft_transfer.xǁSharedSpecificTransferǁforward__mutmut_12", files) == \
        "src/vireid/models/methods/ssft_transfer.py"
    assert tool.file_of("vireid.serve.app.x_f__mutmut_1", files) is None


def test_equivalence_list_format(tool, tmp_path):
    path = tmp_path / "eq.txt"
    path.write_text("# comment\n\nvireid.a.x_f__mutmut_1  max(x, 0) vs max(x, 0.0) on floats\n", encoding="utf-8")
    assert tool.read_equivalent(path) == {"vireid.a.x_f__mutmut_1": "max(x, 0) vs max(x, 0.0) on floats"}
    path.write_text("vireid.a.x_f__mutmut_1\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="eq.txt:1: expected 'MUTANT-NAME REASON'"):
        tool.read_equivalent(path)
    assert tool.read_equivalent(tmp_path / "missing.txt") == {}


def test_numba_kernels_are_found_and_marked(tool, tmp_path):
    source = tmp_path / "k.py"
    source.write_text(
        "import numba\n\n"
        "@numba.njit\n"
        "def kernel(a,\n           b):\n    return a + b\n\n"
        "def compiled():\n    return numba.njit(nogil=True)(lambda x: x)\n\n"
        "def plain(x):\n    return x + 1\n", encoding="utf-8")
    facts = tool.source_facts(source, "k.py")
    assert [name for name, _ in facts.numba] == ["kernel", "compiled"] and facts.decorated == []
    tool.exclude_kernels(source, facts.numba)
    lines = source.read_text(encoding="utf-8").splitlines()
    assert lines[4].endswith("b):  # pragma: no mutate block")      # the signature's last line
    assert lines[7].endswith("def compiled():  # pragma: no mutate block")
    assert "pragma" not in lines[10]
    facts = tool.source_facts(REPO / "src/vireid/retrieval/sim.py", "src/vireid/retrieval/sim.py")
    assert {"_load_kernel", "_kernel_source"} <= {name for name, _ in facts.numba}


def test_scores_count_timeouts_as_detected_and_discount_equivalents(tool, capsys):
    statuses = {"vireid.losses.triplet.x_f__mutmut_1": "killed", "vireid.losses.triplet.x_f__mutmut_2": "timeout",
                "vireid.losses.triplet.x_f__mutmut_3": "survived", "vireid.losses.triplet.x_f__mutmut_4": "survived",
                "vireid.losses.identity.x_g__mutmut_1": "no tests"}
    files = ["src/vireid/losses/triplet.py", "src/vireid/losses/identity.py"]
    payload = tool.report(statuses, files, {"vireid.losses.triplet.x_f__mutmut_4": "same value"}, [])
    triplet = payload["files"]["src/vireid/losses/triplet.py"]
    assert (triplet["total"], triplet["detected"], triplet["equivalent"]) == (4, 2, 1)
    package = payload["packages"]["losses"]
    assert (package["total"], package["detected"], package["equivalent"]) == (5, 2, 1)
    out = capsys.readouterr().out
    assert "2/5 detected (40.0 %), 2/4 of non-equivalent (50.0 %)" in out
    assert "survived  vireid.losses.triplet.x_f__mutmut_4  [equivalent: same value]" in out
    assert "no tests  vireid.losses.identity.x_g__mutmut_1" in out
