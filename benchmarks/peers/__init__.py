"""fedmed against the frameworks a user would pick instead (issue 18): a plain Flower app and
NVIDIA FLARE on fedmed's federation job, from their own venv (``.venv-peers``)."""
