"""What the part-diversity loss L_pd (SAAI Eq. 4) does to the prototypes' masks of trained models.

For the checkpoints of ``benchmarks/methods.py``'s SAAI variants (read from its cache), runs test
images of both modalities through each model and reports, per variant (mean over seeds), the masks
S = sigmoid(P (T + E)^T) of SAAI Eq. 1 on the n positions of the feature map:

* ``mean S``: mean mask value (the share of the map a part averages over, Eq. 2);
* ``saturated``: share of mask values below 0.05 or above 0.95;
* ``positions``: positions per prototype with S > 0.5;
* ``pair dist``: mean Euclidean distance between two prototypes' masks (what L_pd maximises);
* ``same-argmax``: share of prototype pairs whose strongest position coincides.

    python benchmarks/saai_masks.py --cache runs/bench_methods/cache --images 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vireid.data.records import Modality
from vireid.data.transforms import load_eval_image
from vireid.engine.checkpoint import load_checkpoint_model


def mask_statistics(masks: np.ndarray) -> dict[str, float]:
    """Statistics of masks (B, p, n), see the module docstring."""
    b, p, n = masks.shape
    diff = masks[:, :, None, :] - masks[:, None, :, :]
    dist = np.sqrt((diff ** 2).sum(-1))
    upper = np.triu_indices(p, 1)
    top = masks.argmax(-1)
    same = (top[:, :, None] == top[:, None, :])[:, upper[0], upper[1]]
    return {"positions_n": n, "prototypes": p, "mean_S": float(masks.mean()),
            "saturated": float(((masks < 0.05) | (masks > 0.95)).mean()),
            "positions_over_half": float((masks > 0.5).sum(-1).mean()),
            "pair_distance": float(dist[:, upper[0], upper[1]].mean()), "same_argmax": float(same.mean())}


def test_images(data_root: Path, count: int, seed: int) -> list[tuple[Path, Modality]]:
    """``count`` images of the test cameras (visible cams 1, 2, 4, 5 and infrared 3, 6), seeded."""
    files = [(path, Modality.INFRARED if path.parts[-3] in ("cam3", "cam6") else Modality.VISIBLE)
             for path in sorted(data_root.glob("cam*/*/*.jpg"))]
    chosen = np.random.default_rng(seed).choice(len(files), size=min(count, len(files)), replace=False)
    return [files[i] for i in sorted(chosen)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_methods/cache"))
    parser.add_argument("--variants", nargs="+", default=["saai-id-only", "saai-no-lcs", "saai-no-lpd", "saai"])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    data_root = next((args.cache.parent / "data").iterdir())  # the benchmark's rendered dataset, beside the cache
    images = test_images(data_root, args.images, args.seed)
    modality = torch.tensor([int(m) for _, m in images])
    for entry in sorted(args.cache.iterdir()):
        info = entry / "run.json"
        if not info.is_file():
            continue
        run = json.loads(info.read_text())
        if run.get("variant") not in rows:
            continue
        model, cfg = load_checkpoint_model(entry / "train" / "checkpoints" / "last.pt")
        batch = torch.stack([load_eval_image(path, cfg.transforms) for path, _ in images])
        with torch.no_grad():
            feature_map = model.backbone(batch, modality)
            _, _, masks = model.parts(feature_map)
        rows[run["variant"]].append(mask_statistics(masks.numpy()))
    keys = ("mean_S", "saturated", "positions_over_half", "pair_distance", "same_argmax")
    print(f"{'variant':14} {'seeds':>5} {'n':>3} {'p':>3} " + " ".join(f"{k:>20}" for k in keys))
    for variant, stats in rows.items():
        if not stats:
            print(f"{variant:14} no trained runs in {args.cache}")
            continue
        cells = [f"{np.mean([s[k] for s in stats]):10.3f} ± {np.std([s[k] for s in stats]):6.3f}" for k in keys]
        print(f"{variant:14} {len(stats):5d} {stats[0]['positions_n']:3d} {stats[0]['prototypes']:3d} " + " ".join(
            f"{c:>20}" for c in cells))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
