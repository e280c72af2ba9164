"""How a fedmed command ends: a user error is one line and exit code 2; a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedmed.cli import main as fedmed_main
from fedmed.errors import FedmedError, MissingExtra, RunError, RunTimeout, TrainingDiverged, UsageError

_RUN = ("import sys\nfrom fedmed.errors import MissingExtra, RunError, RunTimeout, TrainingDiverged, UsageError, "
        "run_command\n"
        "def boom():\n    raise {exc}\nsys.exit(run_command('fedmed', boom))\n")


@pytest.mark.parametrize("exc, user_error", [
    ("UsageError('--split must be one of all, test')", True),
    ("RunError('the simulated federation did not complete')", True),
    ("RunTimeout('only 1 of the 2 required sites connected within 5s')", True),
    ("FileNotFoundError('config file not found: x.yaml')", True),
    ("TrainingDiverged('hospital_a: training loss is nan; lower the learning rate')", True),
    ("MissingExtra('ONNX export needs the onnx package: pip install fedmed[export]')", True),
    ("RuntimeError('mat1 and mat2 shapes cannot be multiplied (4x8 and 16x2)')", False),
    ("ValueError('a bare ValueError from a bug')", False),
    ("TimeoutError('a bare TimeoutError from a library')", False),
])
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(exc, user_error):
    res = subprocess.run([sys.executable, "-c", _RUN.format(exc=exc)], capture_output=True, text=True,
                         timeout=120)
    message = exc.split("'")[1]
    if user_error:
        assert res.returncode == 2 and res.stderr == f"fedmed: error: {message}\n", res.stderr
    else:
        assert res.returncode == 1, res.stderr
        assert "Traceback (most recent call last)" in res.stderr and message in res.stderr
        assert "fedmed: error:" not in res.stderr


def test_fedmed_errors_keep_the_builtin_base_callers_catch():
    assert issubclass(UsageError, ValueError) and issubclass(RunError, RuntimeError)
    assert issubclass(RunTimeout, TimeoutError) and issubclass(TrainingDiverged, FloatingPointError)
    assert issubclass(MissingExtra, ModuleNotFoundError)
    assert all(issubclass(c, FedmedError) for c in (UsageError, RunError, RunTimeout, TrainingDiverged, MissingExtra))


def test_a_bug_inside_a_command_is_not_hidden(tmp_path, monkeypatch, capsys):
    """A RuntimeError raised inside ``fedmed certs`` propagates (traceback); it is not a message."""
    import fedmed.cli.certs as certs_cmd

    def broken(*_a, **_k):
        raise RuntimeError("shape mismatch inside the command")

    monkeypatch.setattr(certs_cmd, "create_certificates", broken)
    with pytest.raises(RuntimeError, match="shape mismatch inside the command"):
        fedmed_main(["certs", "--out", str(tmp_path / "certs"), "--host", "127.0.0.1"])
    assert "error:" not in capsys.readouterr().err


def test_a_user_error_inside_a_command_is_one_line(tmp_path, capsys):
    """The real ``fedmed`` console script: a missing config is one line, exit code 2, no trace."""
    res = subprocess.run([str(Path(sys.executable).parent / "fedmed"), "train-local", "-c",
                          str(tmp_path / "absent.yaml")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("fedmed: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert _code_of(["data", "import", "folder", str(tmp_path), "--out", str(tmp_path / "o")], capsys) == 2


def _code_of(argv: list[str], capsys) -> int:
    code = fedmed_main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedmed: error: "), err
    return code


_EXIT = """
import atexit, gc, os, sys
from fedmed.errors import freeze_at_exit, run_command
gc.disable()  # leave the cycle below to the interpreter's last collection
class Cycle:
    def __init__(self):
        self.me, self.write = self, os.write
    def __del__(self):
        self.write(2, b"collected at exit\\n")
Cycle()
atexit.register(lambda: sys.stderr.write("exit handler ran\\n"))
{call}
"""


@pytest.mark.parametrize("call", ["", "sys.exit(run_command('fedmed', lambda: 0))", "freeze_at_exit()"])
def test_a_command_leaves_without_the_last_collection_but_runs_exit_handlers(call):
    """fedmed's commands skip the interpreter's final collection of every live object (seconds
    with torch and Flower loaded) and keep the exit handlers; a plain script keeps both."""
    res = subprocess.run([sys.executable, "-c", _EXIT.format(call=call)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "exit handler ran" in res.stderr, res.stderr
    assert ("collected at exit" in res.stderr) == (call == ""), res.stderr
