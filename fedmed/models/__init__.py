"""Models: backbone factory, record Transformer, notes encoder and the fusion model."""

from fedmed.models.backbones import create_backbone, list_backbones, register_backbone
from fedmed.models.fusion import FusionModel, build_model
from fedmed.models.norm import local_keys
from fedmed.models.pretrained import LoadReport, WeightsMismatch, load_pretrained

__all__ = ["FusionModel", "LoadReport", "WeightsMismatch", "build_model", "create_backbone", "list_backbones",
           "load_pretrained", "local_keys", "register_backbone"]
