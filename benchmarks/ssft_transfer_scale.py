"""cm-SSFT test-time transfer at growing N: time and peak memory of the neighbour-list SSTN.

Each size runs in a fresh process (so its peak resident memory is its own) on random clustered
features: all-queries mode over N = Q + G nodes, and single-query mode for 64 queries against the
gallery. The dense N × N float32 affinity that the lists replace is printed for comparison.

Run: ``python benchmarks/ssft_transfer_scale.py [--sizes 2000 8000 32000] [--dim 512] [--k 4]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np
import torch

from vireid.models.methods.ssft_transfer import SharedSpecificTransfer


def _features(n: int, dim: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = rng.normal(size=(max(2, n // 8), dim)).astype(np.float32)
    owner = rng.integers(0, len(centres), size=n)
    noisy = lambda: np.abs(centres[owner] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32))  # noqa: E731
    return torch.from_numpy(noisy()), torch.from_numpy(noisy())


def _run(n: int, dim: int, k: int, threads: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    module = SharedSpecificTransfer(dim, dim, num_classes=10).eval()
    shared, specific = _features(n, dim, rng)
    modality = torch.from_numpy((np.arange(n) >= n // 2).astype(np.int64))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    module.transfer_all(shared, specific, modality, k)
    all_s = time.perf_counter() - start
    all_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queries = slice(0, 64)
    gallery = slice(n // 2, n)
    start = time.perf_counter()
    module.single_query_distance((shared[queries], specific[queries], modality[queries]),
                                 (shared[gallery], specific[gallery], modality[gallery]), k, float(k))
    single_s = time.perf_counter() - start
    queue.put((all_s, (all_rss - base_rss) / 1024, single_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"d = {args.dim}, k = {args.k}, {args.threads} threads; features alone: N x d x 4 B x 2 (H, P)")
    print(f"{'N':>7} {'all s':>7} {'all +MiB':>9} {'dense NxN MiB':>14} {'single 64q s':>13} {'peak MiB':>9}")
    for n in args.sizes:
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(n, args.dim, args.k, args.threads, queue))
        proc.start()
        all_s, all_mib, single_s, peak = queue.get()
        proc.join()
        print(f"{n:>7} {all_s:7.2f} {all_mib:9.1f} {n * n * 4 / 2**20:14.1f} {single_s:13.2f} {peak:9.1f}")


if __name__ == "__main__":
    main()
