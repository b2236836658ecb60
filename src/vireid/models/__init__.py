"""Models: the two-stream backbone, pooling/BNNeck heads, and method models behind a registry."""

from vireid.models.base import ReIDModel
from vireid.models.registry import ModelConfig, create_model, list_methods, register_method

__all__ = ["ModelConfig", "ReIDModel", "create_model", "list_methods", "register_method"]
