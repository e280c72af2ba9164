"""Models: backbone factory, record Transformer, notes encoder and the fusion model."""

from fedmed.models.backbones import create_backbone, list_backbones, register_backbone
from fedmed.models.fusion import FusionModel, build_model

__all__ = ["FusionModel", "build_model", "create_backbone", "list_backbones", "register_backbone"]
