"""Mutation testing of the losses, the method models and the re-rankers (mutmut), with a score per package and file.

Each source file is mapped to the test files that should kill its mutants (``MAPPING``); files with
the same tests are mutated in one ``mutmut run`` in a scratch copy of the repository
(``WORKDIR/<group>``), so the repository is never touched. mutmut runs with forkserver process
isolation (plain fork deadlocks torch) and ``VIREID_GOLDEN`` pointing at the golden reference data.
A scratch copy keeps mutmut's results: rerunning the same command resumes where it stopped
(``--time-limit`` stops a run cleanly after N minutes so long packages can be split into several
sessions), and ``--report-only`` prints the scores of what has run. ``--sample F`` tests a seeded
random fraction F of each group's mutants (all are generated, the sample is drawn from them) and
gives each score with its Wilson 95 % interval: an unbiased estimate when a full run takes hours.

Score per file and package: detected / total, where detected = killed + timeout (a mutant that makes
the tests hang is caught). With an equivalence list (``--equivalent``, default
``tools/mutation_equivalent.txt``: one ``mutant-name  reason`` per line, ``#`` comments), also
detected / (total − equivalent). Every undetected mutant is listed (``survived``, or ``no tests``:
no mapped test executes the function), marked when judged equivalent.

Not mutated, and said so in the output: numba-compiled kernels (functions that call or are decorated
with ``numba.njit``/``jit``, and the generators of their source in ``NUMBA_KERNELS``), and what
mutmut 3 itself never mutates: decorated functions (other than static/class methods) and their
decorators.

Examples (heavy: run under the shared CPU lock, 2 workers)::

    python tools/mutation.py --packages losses
    python tools/mutation.py --files src/vireid/retrieval/aim.py --time-limit 15
    python tools/mutation.py --packages retrieval --sample 0.25 --seed 0   # a quarter, with a 95 % interval
    python tools/mutation.py --report-only --json mutation.json
    python tools/mutation.py --show vireid.losses.triplet.x_batch_hard_triplet_loss__mutmut_3

Not part of CI (minutes to hours).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")
DEFAULT_WORKDIR = Path("/tmp") / "vireid-mutation"
DEFAULT_EQUIVALENT = REPO / "tools" / "mutation_equivalent.txt"
PACKAGES = {"losses": "src/vireid/losses", "methods": "src/vireid/models/methods", "retrieval": "src/vireid/retrieval"}

_RERANK_TESTS = ("tests/test_rerank_golden.py", "tests/test_rerank_paper.py", "tests/test_rerank_exact.py",
                 "tests/test_ranked.py", "tests/test_rerank_mutants.py")
#: source file -> the test files that should kill its mutants.
MAPPING: dict[str, tuple[str, ...]] = {
    "src/vireid/losses/__init__.py": ("tests/test_losses.py",),
    "src/vireid/losses/identity.py": ("tests/test_losses.py",),
    "src/vireid/losses/triplet.py": ("tests/test_losses.py",),
    "src/vireid/losses/adversarial.py": ("tests/test_method_ssft.py", "tests/test_method_ssft_losses.py"),
    "src/vireid/losses/modality_terms.py": ("tests/test_method_ssft_losses.py",),
    "src/vireid/losses/affinity.py": ("tests/test_method_df2am.py",),
    "src/vireid/losses/center_separation.py": ("tests/test_method_saai.py",),
    "src/vireid/losses/part_diversity.py": ("tests/test_method_saai.py",),
    "src/vireid/models/methods/__init__.py": ("tests/test_engine_baseline.py", "tests/test_method_baseline.py"),
    "src/vireid/models/methods/baseline.py": ("tests/test_engine_baseline.py", "tests/test_method_baseline.py"),
    "src/vireid/models/methods/df2am.py": ("tests/test_method_df2am.py",),
    "src/vireid/models/methods/saai.py": ("tests/test_method_saai.py",),
    "src/vireid/models/methods/ssft.py": ("tests/test_method_ssft.py",),
    "src/vireid/models/methods/ssft_transfer.py": ("tests/test_method_ssft.py",),
    "src/vireid/models/methods/ssft_figure.py": ("tests/test_method_ssft_training.py", "tests/test_ssft_figure.py"),
    "src/vireid/models/methods/xiv.py": ("tests/test_method_xiv.py",),
    "src/vireid/retrieval/__init__.py": ("tests/test_rerank_paper.py",),
    "src/vireid/retrieval/aim.py": _RERANK_TESTS,
    "src/vireid/retrieval/sim.py": (*_RERANK_TESTS, "tests/test_scan_and_network_mutants.py"),
    "src/vireid/retrieval/kreciprocal.py": _RERANK_TESTS,
    "src/vireid/retrieval/exact.py": ("tests/test_rerank_exact.py", "tests/test_rerank_paper.py",
                                      "tests/test_rerank_units.py", "tests/test_retrieval_mutants.py",
                                      "tests/test_ivf_scan.py", "tests/test_scan_and_network_mutants.py"),
    "src/vireid/retrieval/api.py": ("tests/test_rerank_paper.py", "tests/test_rerank_exact.py",
                                    "tests/test_cli_rerank.py", "tests/test_rerank_units.py",
                                    "tests/test_retrieval_mutants.py"),
    "src/vireid/retrieval/presets.py": ("tests/test_rerank_paper.py", "tests/test_rerank_exact.py",
                                        "tests/test_cli_rerank.py", "tests/test_rerank_units.py",
                                        "tests/test_retrieval_mutants.py"),
    "src/vireid/retrieval/graph.py": ("tests/test_knn.py", "tests/test_ranked.py", "tests/test_knn_mutants.py"),
    "src/vireid/retrieval/knn.py": ("tests/test_knn.py", "tests/test_ranked.py", "tests/test_knn_mutants.py",
                                    "tests/test_ivf_scan.py", "tests/test_scan_and_network_mutants.py"),
    "src/vireid/retrieval/ranked.py": ("tests/test_ranked.py", "tests/test_ranked_mutants.py"),
    "src/vireid/retrieval/synthetic.py": ("tests/test_rerank_paper.py", "tests/test_cli_rerank.py"),
    "src/vireid/retrieval/gallery_state.py": ("tests/test_single_query.py", "tests/test_index.py",
                                              "tests/test_gallery_state_mutants.py",
                                              "tests/test_scan_and_network_mutants.py"),
    "src/vireid/retrieval/single.py": ("tests/test_single_query.py", "tests/test_index.py",
                                       "tests/test_gallery_state_mutants.py"),
}
#: functions that generate the Python source numba compiles (excluded with the kernels themselves).
NUMBA_KERNELS: dict[str, tuple[str, ...]] = {"src/vireid/retrieval/sim.py": ("_kernel_source",)}

DETECTED = ("killed", "timeout")
UNDETECTED = ("survived", "no tests")
NOT_RUN = ("not checked", "check was interrupted by user")


# --------------------------------------------------------------------------- source analysis

def _is_numba(node: ast.AST) -> bool:
    """``numba.njit``, ``numba.jit``, ``njit``, ``jit`` (called or not)."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return isinstance(node.value, ast.Name) and node.value.id == "numba" and node.attr in ("njit", "jit", "vectorize")
    return isinstance(node, ast.Name) and node.id in ("njit", "jit")


@dataclass
class SourceFacts:
    numba: list[tuple[str, int]] = field(default_factory=list)      # (function, line of its def)
    decorated: list[str] = field(default_factory=list)              # functions mutmut skips


def source_facts(path: Path, rel: str) -> SourceFacts:
    """The numba kernels (to exclude) and the decorated functions (mutmut skips them) of one file."""
    facts = SourceFacts()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        kernel = (any(_is_numba(d) for d in node.decorator_list)
                  or any(_is_numba(n) for n in ast.walk(node) if isinstance(n, ast.Call))
                  or node.name in NUMBA_KERNELS.get(rel, ()))
        if kernel:
            facts.numba.append((node.name, node.lineno))
        simple = [d for d in node.decorator_list if isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod")]
        if node.decorator_list and not (len(node.decorator_list) == 1 and simple) and not kernel:
            facts.decorated.append(node.name)
    return facts


def exclude_kernels(path: Path, kernels: Iterable[tuple[str, int]]) -> None:
    """Mark each kernel's ``def`` line ``# pragma: no mutate block`` (mutmut skips the whole function)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for _name, lineno in kernels:
        index = lineno - 1
        while not lines[index].rstrip().endswith(":"):  # a signature over several lines: its last line
            index += 1
        line = lines[index].rstrip("\n")
        lines[index] = f"{line}  # pragma: no mutate block\n"
    path.write_text("".join(lines), encoding="utf-8")


def not_mutated_notes(files: Sequence[str]) -> list[str]:
    """One line per file with numba kernels (excluded here) or decorated functions (mutmut skips them)."""
    notes = []
    for rel in files:
        facts = source_facts(REPO / rel, rel)
        if facts.numba:
            notes.append(f"{rel}: numba kernel(s), excluded: {', '.join(n for n, _ in facts.numba)}")
        if facts.decorated:
            notes.append(f"{rel}: decorated, skipped by mutmut: {', '.join(facts.decorated)}")
    return notes


# --------------------------------------------------------------------------- running mutmut

def package_of(rel: str) -> str:
    return next(name for name, folder in PACKAGES.items() if rel.startswith(folder + "/"))


def all_groups() -> dict[str, list[str]]:
    """Files of one package with the same tests share one mutmut run (and one scratch copy).

    The groups do not depend on what is selected, so results persist across selections."""
    by_key: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for rel, tests in MAPPING.items():
        by_key.setdefault((package_of(rel), tests), []).append(rel)
    return {f"{package}-{Path(members[0]).stem.strip('_') or 'init'}": members
            for (package, _tests), members in by_key.items()}


def groups_for(files: Sequence[str]) -> dict[str, list[str]]:
    """The groups that hold any of ``files`` (a group is always run whole)."""
    return {name: members for name, members in all_groups().items() if set(members) & set(files)}


def prepare_workdir(workdir: Path, files: Sequence[str], tests: Sequence[str]) -> None:
    """A scratch copy of the repository configured for mutmut, numba kernels marked not to be mutated."""
    fresh = not (workdir / "mutants").is_dir()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    if fresh:
        shutil.copytree(REPO, workdir, ignore=shutil.ignore_patterns(
            ".git", "runs", "mutants", "__pycache__", ".pytest_cache", "*.egg-info", ".venv", "node_modules"))
    for rel in files:
        facts = source_facts(REPO / rel, rel)
        if facts.numba and fresh:
            exclude_kernels(workdir / rel, facts.numba)
    pyproject = workdir / "pyproject.toml"
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    text += "\n[tool.mutmut]\n" + "\n".join([
        'source_paths = ["src/vireid"]',
        f"only_mutate = {json.dumps(list(files))}",
        f"pytest_add_cli_args_test_selection = {json.dumps(list(tests))}",
        'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider"]',
        'process_isolation = "forkserver"',
        'also_copy = ["configs", "docs"]',  # tests train from the tiny configs, check the documented tables
        "use_git_change_detection = false",
    ]) + "\n"
    pyproject.write_text(text, encoding="utf-8")


def run_mutmut(workdir: Path, max_children: int, time_limit_s: float | None, log: Path,
               names: Sequence[str] = ()) -> str:
    """``mutmut run [NAMES]`` in ``workdir``; stopped with SIGINT (results kept) after ``time_limit_s``."""
    env = dict(os.environ, VIREID_GOLDEN=str((REPO / ".." / "shared" / "golden").resolve())
               if not os.environ.get("VIREID_GOLDEN") else os.environ["VIREID_GOLDEN"],
               PYTHONPATH=str(workdir / "src"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with log.open("a", encoding="utf-8") as out:
        proc = subprocess.Popen([str(MUTMUT), "run", "--max-children", str(max_children), *names], cwd=workdir,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=time_limit_s)
            return "finished" if proc.returncode == 0 else f"mutmut exited with {proc.returncode} (see {log})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "stopped at the time limit (rerun to continue)"


def draw(names: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The seeded sample of ``fraction`` of ``names`` (the same for the same names and seed)."""
    import random

    ordered = sorted(names)
    return set(random.Random(seed).sample(ordered, max(1, round(fraction * len(ordered))))) if ordered else set()


def sample_mutants(workdir: Path, fraction: float, seed: int, max_children: int, time_limit_s: float | None,
                   log: Path) -> tuple[list[str], str]:
    """A seeded sample of ``fraction`` of the group's mutants (generated first, nothing run), less
    those already tested; a rerun with the same seed draws the same sample and resumes it."""
    if not mutmut_results(workdir):  # generate the mutants and the test statistics, run no mutant
        run_mutmut(workdir, max_children, time_limit_s, log, names=["vireid-generate-only"])
    statuses = mutmut_results(workdir)
    if not statuses:
        return [], f"no mutants generated (see {log})"
    chosen = draw(list(statuses), fraction, seed)
    todo = sorted(name for name in chosen if statuses[name] in NOT_RUN)
    return todo, f"sample of {len(chosen)} of {len(statuses)} mutants, {len(todo)} still to run"


def mutmut_results(workdir: Path) -> dict[str, str]:
    """Every mutant's status in ``workdir`` (``mutmut results --all true``)."""
    if not (workdir / "mutants").is_dir():
        return {}
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=workdir, capture_output=True, text=True,
                         check=False, env=dict(os.environ, PYTHONPATH=str(workdir / "src")))
    statuses = {}
    for line in out.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            statuses[name] = status.strip()
    return statuses


# --------------------------------------------------------------------------- scores

def module_of(rel: str) -> str:
    module = rel.removeprefix("src/").removesuffix(".py").replace("/", ".")
    return module.removesuffix(".__init__")


def file_of(mutant: str, files: Sequence[str]) -> str | None:
    """The source file of ``mutant`` (``pkg.module.x_func__mutmut_3`` or ``pkg.module.xǁClassǁmethod__mutmut_3``)."""
    module = re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0].removesuffix(".__init__")
    for rel in files:
        if module_of(rel) == module:
            return rel
    return None


def read_equivalent(path: Path | None) -> dict[str, str]:
    """``mutant-name  reason`` per line (``#`` starts a comment line); a missing file is an empty list."""
    if path is None or not path.is_file():
        return {}
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}:{number}: expected 'MUTANT-NAME REASON', got {line!r}")
        out[name] = reason.strip()
    return out


@dataclass
class Score:
    total: int = 0
    detected: int = 0
    equivalent: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, status: str, equivalent: bool) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        if status in NOT_RUN:  # a run stopped early: reported, not scored
            return
        self.total += 1
        self.detected += status in DETECTED
        self.equivalent += equivalent and status not in DETECTED

    def interval(self) -> tuple[float, float]:
        """Wilson 95 % interval of the detected share (what a sample says about all mutants)."""
        n, z = self.total, 1.96
        if not n:
            return 0.0, 1.0
        p = self.detected / n
        centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)

    def text(self, with_equivalent: bool, sampled: bool = False) -> str:
        pct = f"{100 * self.detected / self.total:.1f} %" if self.total else "—"
        if sampled and self.total:
            low, high = self.interval()
            pct += f", 95 % interval {100 * low:.1f}–{100 * high:.1f} %"
        line = f"{self.detected}/{self.total} detected ({pct})"
        if with_equivalent:
            relevant = self.total - self.equivalent
            pct2 = f"{100 * self.detected / relevant:.1f} %" if relevant else "—"
            line += f", {self.detected}/{relevant} of non-equivalent ({pct2})"
        others = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()) if k not in ("killed",))
        return line + (f"; {others}" if others else "")


def report(statuses: dict[str, str], files: Sequence[str], equivalent: dict[str, str],
           notes: Sequence[str], sampled: bool = False) -> dict[str, object]:
    """Print the scores per package and per file and the undetected mutants; return them as a dict."""
    with_eq = bool(equivalent)
    per_file = {rel: Score() for rel in files}
    undetected: dict[str, list[tuple[str, str]]] = {rel: [] for rel in files}
    for name, status in sorted(statuses.items()):
        rel = file_of(name, files)
        if rel is None:
            continue
        per_file[rel].add(status, name in equivalent)
        if status not in DETECTED and status not in NOT_RUN:
            undetected[rel].append((name, status))
    payload: dict[str, object] = {"packages": {}, "files": {}, "excluded": list(notes)}
    for package, folder in PACKAGES.items():
        members = [rel for rel in files if rel.startswith(folder + "/")]
        if not members:
            continue
        total = Score()
        for rel in members:
            for status, count in per_file[rel].counts.items():
                for _ in range(count):
                    total.add(status, False)
            total.equivalent += per_file[rel].equivalent
        print(f"\n== {package} ({folder}): {total.text(with_eq, sampled)}")
        payload["packages"][package] = total.__dict__  # type: ignore[index]
        for rel in members:
            tests = " ".join(Path(t).name for t in MAPPING[rel])
            shown = per_file[rel].text(with_eq, sampled) if per_file[rel].total else "no results (no mutants, or not run)"
            print(f"  {rel}: {shown}   [tests: {tests}]")
            payload["files"][rel] = {**per_file[rel].__dict__, "tests": list(MAPPING[rel]),  # type: ignore[index]
                                     "undetected": [{"mutant": n, "status": s, "equivalent": equivalent.get(n)}
                                                    for n, s in undetected[rel]]}
            for name, status in undetected[rel]:
                mark = f"  [equivalent: {equivalent[name]}]" if name in equivalent else ""
                print(f"      {status:<9} {name}{mark}")
    print("\nNot mutated (numba kernels are excluded here; mutmut 3 skips decorated functions other than "
          "static/class methods, and decorators):")
    for note in notes:
        print(f"  {note}")
    stale = sorted(set(equivalent) - set(statuses))
    if stale and statuses:
        print(f"\n{len(stale)} entries of the equivalence list name no mutant of this run: {', '.join(stale[:10])}")
    return payload


# --------------------------------------------------------------------------- command line

def select_files(packages: Sequence[str] | None, files: Sequence[str] | None) -> list[str]:
    chosen = [rel for rel in MAPPING if not packages or any(rel.startswith(PACKAGES[p] + "/") for p in packages)]
    if files:
        unknown = [f for f in files if f not in MAPPING]
        if unknown:
            raise SystemExit(f"--files: not in the mapping: {', '.join(unknown)} (mapped: {', '.join(MAPPING)})")
        chosen = [rel for rel in chosen if rel in files]
    missing = [rel for rel in chosen if not (REPO / rel).is_file()]
    if missing:
        raise SystemExit(f"mapped source files missing from the repository: {', '.join(missing)}")
    unmapped = sorted({str(p.relative_to(REPO)) for folder in PACKAGES.values() for p in (REPO / folder).glob("*.py")}
                      - set(MAPPING))
    if unmapped:
        print(f"warning: source files without a test mapping (not mutated): {', '.join(unmapped)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", nargs="+", choices=sorted(PACKAGES), help="packages to mutate (default: all three)")
    parser.add_argument("--files", nargs="+", metavar="PATH", help="only these source files (repository-relative)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"scratch copies, one folder per test group; results persist there (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--equivalent", type=Path, default=DEFAULT_EQUIVALENT,
                        help="survivors judged equivalent: 'MUTANT-NAME REASON' per line "
                             "(default: tools/mutation_equivalent.txt; missing: no list)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default: 2)")
    parser.add_argument("--time-limit", type=float, metavar="MIN",
                        help="stop after MIN minutes in all (results so far are kept; rerun to continue)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier results of the selected groups first")
    parser.add_argument("--sample", type=float, default=1.0, metavar="FRACTION",
                        help="run a seeded random sample of this fraction of each group's mutants (default 1: all); "
                             "scores then come with a 95 %% interval")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample (the same seed resumes the same sample)")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the results in --workdir")
    parser.add_argument("--json", type=Path, help="also write the scores and undetected mutants as JSON")
    parser.add_argument("--list", action="store_true", help="print the file -> tests mapping and the groups, then exit")
    parser.add_argument("--show", metavar="MUTANT", help="print one mutant's diff (from its group's workdir) and exit")
    args = parser.parse_args(argv)
    if not 0.0 < args.sample <= 1.0:
        parser.error(f"--sample must be in (0, 1], got {args.sample}")

    selected = select_files(args.packages, args.files)
    groups = groups_for(selected)
    files = [rel for members in groups.values() for rel in members]
    extra = sorted(set(files) - set(selected))
    if extra:
        print(f"also mutated (they share a test group with the selection): {', '.join(extra)}")
    if args.list:
        for group, members in groups.items():
            print(f"{group}: {' '.join(members)}  <-  {' '.join(MAPPING[members[0]])}")
        return 0
    if args.show:
        rel = file_of(args.show, list(MAPPING))
        group = next((g for g, m in all_groups().items() if rel in m), None)
        if group is None:
            raise SystemExit(f"--show: no mapped file for mutant {args.show!r}")
        return subprocess.call([str(MUTMUT), "show", args.show], cwd=args.workdir / group,
                               env=dict(os.environ, PYTHONPATH=str(args.workdir / group / "src")))
    equivalent = read_equivalent(args.equivalent)
    notes = not_mutated_notes(files)
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + 60 * args.time_limit if args.time_limit else None
    args.workdir.mkdir(parents=True, exist_ok=True)
    for group, members in groups.items():
        workdir = args.workdir / group
        tests = MAPPING[members[0]]
        if not args.report_only:
            if args.fresh and workdir.exists():
                shutil.rmtree(workdir)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                print(f"[{group}] not started: time limit reached")
            else:
                prepare_workdir(workdir, members, tests)
                start = time.monotonic()
                print(f"[{group}] mutmut run over {', '.join(members)} with {', '.join(tests)} ...", flush=True)
                log = args.workdir / f"{group}.log"
                if args.sample < 1.0:
                    names, what = sample_mutants(workdir, args.sample, args.seed, args.max_children, left, log)
                    print(f"[{group}] {what}", flush=True)
                    left = None if deadline is None else deadline - time.monotonic()
                    state = run_mutmut(workdir, args.max_children, left, log, names) if names else "nothing to run"
                else:
                    state = run_mutmut(workdir, args.max_children, left, log)
                print(f"[{group}] {state} in {time.monotonic() - start:.0f} s", flush=True)
        statuses.update(mutmut_results(workdir))
    if args.sample < 1.0:  # score the sample alone: earlier full-run results of these groups are left out
        drawn = set().union(*(draw(list(mutmut_results(args.workdir / group)), args.sample, args.seed)
                              for group in groups))
        statuses = {name: status for name, status in statuses.items() if name in drawn}
        print(f"\nScores of a {args.sample:g} sample (seed {args.seed}) of the mutants:")
    payload = report(statuses, files, equivalent, notes, sampled=args.sample < 1.0)
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
