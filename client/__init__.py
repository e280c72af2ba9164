"""fedmed.client: a hospital site — Flower ClientApp and the ``fedmed-client`` CLI."""
