"""``vireid extract``: features of a dataset's test protocol from a trained checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vireid.cli import add_subcommand
from vireid.cli.options import add_device_option, add_threads_option, parse_key_values


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        subparsers, "extract", "extract query/gallery features of a test protocol from a checkpoint",
        "Load a checkpoint, read the dataset, build the protocol's trials and write the feature file "
        "(query_feat, gallery_feat, ids, cams, per-trial index rows) that `vireid evaluate` and "
        "`vireid rerank` read. When the checkpoint's run held out validation identities (data.val_ids > 0) "
        "and the data are the run's training data, the same protocol rule is applied to those identities "
        "and their features are written too (keys val_query_feat, val_gallery_feat, val_query_id, ...), "
        "so that `vireid evaluate --tune-on val` can choose re-ranking parameters without the test set.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint file (last.pt / best.pt), or a run folder: its validation-selected best.pt "
                   "when the run kept one, else its last.pt")
    p.add_argument("--dataset", default=None,
                   help="dataset adapter: sysu, regdb, llcm or manifest (default: the one the model was trained on)")
    p.add_argument("--root", default=None,
                   help="dataset folder, or the CSV file for 'manifest' (default: the training root)")
    p.add_argument("--protocol", required=True,
                   help="data protocol: which test images are queries and which gallery, trial by trial: sysu "
                   "(official gallery draw), sysu-agw (AGW code's draw), regdb, llcm or market. The file records it "
                   "with its metric rule, which `vireid evaluate` applies when given no --protocol (the same "
                   "names; sysu-agw uses sysu)")
    p.add_argument("--protocol-param", action="append", default=[], metavar="NAME=VALUE",
                   help="protocol parameter, repeatable: e.g. mode=indoor, shots=10, direction=thermal-visible, "
                   "trials=3 or trials=[1,2], permutations=seeded (SYSU-layout trees whose image counts differ "
                   "from the official split). RegDB with a model trained on RegDB: only the split it was "
                   "trained on, unless trials says otherwise (with a warning: the other splits test "
                   "identities it trained on)")
    p.add_argument("--out", required=True, type=Path, help="feature file to write (.npz, written atomically)")
    p.add_argument("--flip", action="store_true", help="average each feature with that of the mirrored image")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    add_device_option(p)
    add_threads_option(p)
    p.add_argument("--workers", type=int, default=2, help="image loader processes")
    p.add_argument("--method-option", action="append", default=[], metavar="NAME=VALUE",
                   help="option of the method's test-time step, repeatable (cm-SSFT: mode=all|single, k=4)")
    p.add_argument("--no-validation", action="store_true",
                   help="do not write the validation identities' features (default: written when the run held "
                   "validation identities out of training)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vireid.cli.options import torch_device
    from vireid.data.protocols import regdb_trials_for_split
    from vireid.engine.checkpoint import load_checkpoint_model, resolve_checkpoint
    from vireid.engine.extraction import set_default_workers
    from vireid.engine.pipeline import extract_protocol_features, held_out_records, validation_query_modality
    from vireid.errors import InputError
    from vireid.features import save_features

    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    set_default_workers(args.workers)
    checkpoint, description = resolve_checkpoint(args.checkpoint)
    print(f"checkpoint: {description}")
    model, cfg = load_checkpoint_model(checkpoint)
    device = torch_device(args.device)
    dataset = args.dataset or cfg.data.dataset
    root = args.root or cfg.data.root
    options = cfg.data.options if dataset == cfg.data.dataset else {}
    protocol_params = parse_key_values(args.protocol_param, "--protocol-param")
    if args.protocol == "regdb" and dataset == cfg.data.dataset == "regdb":
        protocol_params, warning = regdb_trials_for_split(protocol_params, int(cfg.data.options.get("trial", 1)))
        if warning:
            print(f"vireid extract: warning: {warning}", file=sys.stderr)
    held_out = [] if args.no_validation else held_out_records(cfg, dataset, root)
    features = extract_protocol_features(
        model, cfg.transforms, dataset=dataset, root=root, dataset_options=options,
        protocol=args.protocol, protocol_params=protocol_params,
        flip=args.flip, batch_size=args.batch_size, device=device,
        finalize_options=parse_key_values(args.method_option, "--method-option"),
        meta={"checkpoint": str(checkpoint), "method": cfg.model.method},
        validation_records=held_out, validation_query=validation_query_modality(cfg),
    )
    save_features(args.out, features)
    print(f"wrote {args.out}: {len(features.query_id)} query and {len(features.gallery_id)} gallery images, "
          f"{features.num_trials} trial(s), d={features.query_feat.shape[1]}")
    if features.validation is not None:
        val = features.validation
        print(f"  validation: {features.meta['validation']['num_ids']} held-out training identities, "
              f"{len(val.query_id)} query and {len(val.gallery_id)} gallery images, {val.num_trials} trial(s)")
    elif not args.no_validation:
        print("  no validation features: the run held no identities out of training (data.val_ids = 0) "
              "or the data differ from its training data")
    return 0
