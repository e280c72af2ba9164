"""fedmed.server: the coordinator — Flower ServerApp, aggregation, checkpoints, tracking, CLI."""
