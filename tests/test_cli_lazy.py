"""`fedmed --help` and the light sub-commands start without importing torch or Flower.

Each sub-command imports its library when it runs; the two argparse choice lists spelled in
the CLI must stay the library's own.
"""

from __future__ import annotations

import subprocess
import sys


def test_cli_choices_are_the_library_constants() -> None:
    from fedmed.cli.evaluate import SPLIT_CHOICES
    from fedmed.cli.export import FORMAT_SUFFIXES
    from fedmed.evaluate import SPLITS
    from fedmed.export import FORMATS

    assert SPLIT_CHOICES == SPLITS
    assert FORMAT_SUFFIXES == FORMATS


def test_parser_builds_without_torch_or_flower() -> None:
    code = ("import sys; from fedmed.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'flwr', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"heavy libraries imported by the parser alone: {out.strip()}"


def test_python_dash_m_fedmed_cli_is_the_fedmed_command() -> None:
    res = subprocess.run([sys.executable, "-m", "fedmed.cli", "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.startswith("usage: fedmed"), res.stdout + res.stderr
