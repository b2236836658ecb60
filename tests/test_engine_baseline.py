"""The baseline method and the min-max (adversary) path of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from vireid.engine.checkpoint import load_checkpoint
from vireid.engine.config import load_train_config
from vireid.engine.distributed import DistInfo
from vireid.engine.trainer import Trainer
from vireid.errors import InputError
from vireid.models.methods.baseline import BaselineModel, BaselineParams
from vireid.models.registry import ModelConfig, create_model, list_methods, register_method

from method_training import write_tiny_manifest
from test_engine import _config_dict


def _tiny(**params: object) -> ModelConfig:
    return ModelConfig(backbone="resnet10", pretrained=None, params=dict(params))


@pytest.mark.parametrize("triplet", ["batch_hard", "weighted", "none"])
def test_baseline_train_and_eval_outputs(triplet: str) -> None:
    torch.manual_seed(0)
    model = create_model(_tiny(triplet=triplet, pairs="cross", label_smoothing=0.1), num_classes=3)
    images = torch.randn(6, 3, 32, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    modality = torch.tensor([0, 1, 0, 1, 0, 1])
    outputs = model.train()(images, modality)
    assert outputs["pre_bn"].shape == (6, 512) and outputs["logits"].shape == (6, 3)
    loss, terms = model.compute_loss(outputs, labels, modality)
    assert torch.isfinite(loss) and ("triplet" in terms) == (triplet != "none")
    loss.backward()
    assert model.neck.classifier.weight.grad is not None
    feat = model.eval().extract(images, modality)["feat"]
    assert torch.allclose(feat.norm(dim=1), torch.ones(6), atol=1e-5)


def test_baseline_params_are_validated() -> None:
    assert "baseline" in list_methods()
    with pytest.raises(InputError, match="model.params.marign.*did you mean 'model.params.margin'"):
        create_model(_tiny(marign=0.3), num_classes=2)
    with pytest.raises(InputError, match="label_smoothing"):
        create_model(_tiny(label_smoothing=1.0), num_classes=2)


@dataclass
class MinMaxParams:
    adversarial_weight: float = 0.1


class MinMaxModel(BaselineModel):
    """Baseline + a modality discriminator the features learn to fool (a min-max test method)."""

    def __init__(self, cfg: ModelConfig, params: MinMaxParams, num_classes: int) -> None:
        super().__init__(cfg, BaselineParams(triplet="batch_hard"), num_classes)
        self.weight = params.adversarial_weight
        self.discriminator = nn.Linear(self.backbone.out_channels, 2)

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, terms = super().compute_loss(outputs, labels, modality)
        confusion = -F.cross_entropy(self.discriminator(outputs["pre_bn"]), modality)
        return loss + self.weight * confusion, terms | {"confusion": confusion.detach()}

    def adversary_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def adversary_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> Tensor:
        return F.cross_entropy(self.discriminator(outputs["pre_bn"].detach()), modality)


@register_method("test_minmax", MinMaxParams)
def _build_minmax(cfg: ModelConfig, params: MinMaxParams, num_classes: int) -> MinMaxModel:
    return MinMaxModel(cfg, params, num_classes)


def test_min_max_method_gets_its_own_optimizer(tmp_path: Path) -> None:
    manifest = write_tiny_manifest(tmp_path, ids=4, per_modality=2)
    data = _config_dict(manifest, tmp_path / "run", epochs=1)
    data["data"]["val_ids"] = 0
    data["model"]["method"] = "test_minmax"
    data["model"]["params"] = {"adversarial_weight": 0.5}
    data["optim"]["adversary_lr"] = 0.05
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    trainer = Trainer(load_train_config(tmp_path / "c.yaml"), DistInfo(), torch.device("cpu"))
    adversary = {id(p) for p in trainer.model.adversary_parameters()}
    main_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert adversary and adversary.isdisjoint(main_params)
    assert trainer.adversary_optimizer is not None and trainer.adversary_optimizer.param_groups[0]["lr"] == 0.05
    before = trainer.model.discriminator.weight.detach().clone()
    summary = trainer.run()
    assert summary["best"] is None and summary["global_step"] > 0
    assert not torch.equal(before, trainer.model.discriminator.weight)
    assert "adversary_optimizer" in load_checkpoint(tmp_path / "run")


def test_extract_features_in_record_order_with_flip(tmp_path: Path) -> None:
    from vireid.data.datasets import build_dataset
    from vireid.data.transforms import TransformConfig, load_eval_image
    from vireid.engine.extraction import extract_features

    records = list(build_dataset("manifest", write_tiny_manifest(tmp_path, ids=2, per_modality=2)).train)
    cfg = TransformConfig(height=32, width=16)
    torch.manual_seed(0)
    model = create_model(_tiny(), num_classes=2).eval()
    plain = extract_features(model, records, cfg, batch_size=3)
    assert plain["feat"].shape == (len(records), 512) and plain["feat"].dtype == "float32"
    image = load_eval_image(records[5].path, cfg).unsqueeze(0)
    one = model.extract(image, torch.tensor([int(records[5].modality)]))["feat"]
    assert torch.allclose(torch.from_numpy(plain["feat"][5]), one[0], atol=1e-5)
    flipped = extract_features(model, records, cfg, batch_size=3, flip=True)
    mirrored = model.extract(image.flip(-1), torch.tensor([int(records[5].modality)]))["feat"]
    assert torch.allclose(torch.from_numpy(flipped["feat"][5]), (one[0] + mirrored[0]) / 2, atol=1e-5)


def test_bf16_autocast_on_cpu_and_fp16_refused(tmp_path: Path) -> None:
    manifest = write_tiny_manifest(tmp_path, ids=2, per_modality=2)
    data = _config_dict(manifest, tmp_path / "run", epochs=1, amp="bf16")
    data["data"]["val_ids"] = 0
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    cfg = load_train_config(tmp_path / "c.yaml")
    trainer = Trainer(cfg, DistInfo(), torch.device("cpu"))
    images = torch.randn(8, 3, 32, 16)
    logs = trainer._train_step(images, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1] * 2))
    assert all(bool(torch.isfinite(v)) for v in logs.values())
    cfg.amp = "fp16"
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        Trainer(cfg, DistInfo(), torch.device("cpu"))
