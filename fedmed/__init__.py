"""fedmed: federated learning for hospitals (CNN + Transformer fusion on Flower)."""

__version__ = "0.1.0"
