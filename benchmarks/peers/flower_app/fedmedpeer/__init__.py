"""fedmedpeer: fedmed's benchmark job as a plain Flower / PyTorch app."""
