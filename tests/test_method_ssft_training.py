"""cm-SSFT through the real engine: the min-max alternation, a tiny training run on CPU, and the
reconstruction figure command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vireid.cli import main
from vireid.engine import distributed
from vireid.engine.config import load_train_config
from vireid.engine.trainer import Trainer

from method_training import REPO, train_tiny_config, write_tiny_manifest


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> list[bool]:
    return [not torch.equal(a, b) for a, b in zip(before, after)]


def test_min_max_alternation_through_the_engine(tmp_path):
    manifest = write_tiny_manifest(tmp_path, ids=4, per_modality=2)
    cfg = load_train_config(REPO / "configs" / "ssft_synthetic_tiny.yaml", [
        "data.dataset=manifest", f"data.root={manifest}", "data.val_ids=0", f"output_dir={tmp_path / 'run'}",
        "progress_bar=false", "transforms.height=32", "transforms.width=16", "schedule.warmup_epochs=0"])
    trainer = Trainer(cfg, distributed.DistInfo(), torch.device("cpu"))
    model = trainer.model
    adversary = model.adversary_parameters()
    adversary_ids = {id(p) for p in adversary}
    network = [p for p in model.parameters() if p.requires_grad and id(p) not in adversary_ids]
    assert {id(p) for g in trainer.adversary_optimizer.param_groups for p in g["params"]} == adversary_ids
    assert not adversary_ids & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}

    steps: list[tuple[str, list[bool], list[bool]]] = []
    before: list[list[torch.Tensor]] = []

    def watch(optimizer, name):
        def pre(*_):
            before[:] = [_snapshot(network), _snapshot(adversary)]

        def post(*_):
            steps.append((name, _changed(before[0], _snapshot(network)), _changed(before[1], _snapshot(adversary))))

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)

    watch(trainer.optimizer, "min")
    watch(trainer.adversary_optimizer, "max")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 16, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    modality = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    logs = trainer._train_step(images, labels, modality)

    assert [name for name, _, _ in steps] == ["min", "max"]
    (_, min_net, min_adv), (_, max_net, max_adv) = steps
    assert sum(min_net) > 0.9 * len(network) and not any(min_adv)   # network step: discriminator fixed
    assert all(max_adv) and not any(max_net)                         # adversary step: network fixed
    assert {"loss", "adversary_loss", "ma", "conf", "pa", "re", "transfer", "disc_acc", "adv_grad_h", "id_grad_h",
            "neighbour_precision"} <= set(logs)
    assert 0.0 <= logs["disc_acc"] <= 1.0 and logs["adv_grad_h"] > 0 and logs["id_grad_h"] > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny config trained once (2 epochs on the tiny synthetic set): (folder, what method_training returns)."""
    root = tmp_path_factory.mktemp("ssft_tiny")
    return root, train_tiny_config("ssft", root, ("sampler.epoch_length=identities",))


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained[0]


def test_tiny_config_trains_on_cpu(trained):
    _, result = trained
    summary = result["summary"]
    assert summary["epochs"] == 2 and np.isfinite(summary["history"][-1]["mAP"])
    assert result["after"] < result["before"]
    features = result["features"]
    assert features["feat"].shape[1] == 512 and np.isfinite(features["shared"]).all()
    assert set(np.unique(features["modality"])) == {0.0, 1.0}


def test_reconstruct_command_writes_the_figure(checkpoint, capsys):
    images = (sorted(str(p) for p in checkpoint.glob("sysu/cam[1245]/*/0001.jpg"))[:2]
              + sorted(str(p) for p in checkpoint.glob("sysu/cam[36]/*/0001.jpg"))[:1])
    out = checkpoint / "figure.png"
    code = main(["ssft-reconstruct", "--checkpoint", str(checkpoint / "run"), "--images", *images,
                 "--modality", "visible", "visible", "infrared", "--out", str(out)])
    assert code == 0 and "wrote" in capsys.readouterr().out
    with Image.open(out) as sheet:
        assert sheet.size == (4 * 64, 14 + 3 * 128)       # 32x16 inputs enlarged 4x for the captions
        pixels = np.asarray(sheet.convert("RGB"))
    tiles = [pixels[14:142, c * 64:(c + 1) * 64] for c in range(4)]
    assert all(tile.std() > 0 for tile in tiles)


def test_reconstruct_command_rejects_bad_input(checkpoint, capsys):
    image = sorted(str(p) for p in checkpoint.glob("sysu/cam[1245]/*/0001.jpg"))[0]
    assert main(["ssft-reconstruct", "--checkpoint", str(checkpoint / "run"), "--images", image, image,
                 "--modality", "visible", "infrared", "visible", "--out", str(checkpoint / "x.png")]) == 2
    assert "--modality" in capsys.readouterr().err
    assert main(["ssft-reconstruct", "--checkpoint", str(checkpoint / "run"), "--images", image,
                 "--modality", "ultraviolet", "--out", str(checkpoint / "x.png")]) == 2
    assert "ultraviolet" in capsys.readouterr().err



@pytest.mark.parametrize("mode", ["all", "single"])
def test_extract_and_evaluate_in_both_test_modes(checkpoint, capsys, mode):
    """`vireid extract --method-option mode=...` (SYSU protocol, two seeded trials), then `vireid evaluate`."""
    from vireid.features import load_features

    path = checkpoint / f"features_{mode}.npz"
    assert main(["extract", "--checkpoint", str(checkpoint / "run"), "--protocol", "sysu",
                 "--protocol-param", "permutations=seeded", "--protocol-param", "trials=[0, 1]",
                 "--method-option", f"mode={mode}", "--method-option", "k=2", "--out", str(path)]) == 0
    saved = load_features(path)
    assert saved.meta["ssft"]["mode"] == mode and saved.num_trials == 2
    assert saved.query_feat.shape[0] == 2 * saved.trial_query_index.shape[1]   # each trial owns its query rows
    extra = ["--ranked", str(path)] if mode == "single" else []
    capsys.readouterr()
    assert main(["evaluate", str(path), "--protocol", "sysu", *extra]) == 0
    assert "mAP" in capsys.readouterr().out
