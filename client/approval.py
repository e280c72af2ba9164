"""Which submitted Flower apps a site runs: only the fedmed app it has installed.

A Flower run arrives at the site as a FAB (a zip of the app folder). The site checks it
*before* anything from it is installed or imported — the way Fed-BioMed nodes approve a
training plan by hash — and runs it only when it is exactly the app that
:func:`fedmed.flower.write_app_dir` builds: a ``pyproject.toml`` and Flower's
``.info/CONTENT`` manifest, no code files, the allow-listed components, no dependencies and
the site's own fedmed version. Code then comes from the installed package only.

Plain ``zipfile``/``tomllib``: Flower 1.42 verifies FABs only by signatures from its
platform (a SuperLink "valid_license" record), which an offline federation does not have.
"""

from __future__ import annotations

import io
import sys
import zipfile

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

import fedmed
from fedmed.errors import FedmedError

__all__ = ["ALLOWED_COMPONENTS", "AppRefused", "check_fab"]

ALLOWED_COMPONENTS = {"serverapp": "fedmed.server.app:app", "clientapp": "fedmed.client.app:app"}
_ALLOWED_FILES = {"pyproject.toml", ".info/CONTENT"}
_MAX_PYPROJECT = 64 * 1024  # fedmed's is ~0.5 KiB; a larger one is not ours


class AppRefused(FedmedError):
    """The submitted app is not the approved fedmed app.

    ``public`` is fixed text (safe to send to the server); ``detail`` may name the FAB's
    files or values and stays in the site's own log.
    """

    def __init__(self, public: str, detail: str) -> None:
        super().__init__(public)
        self.public, self.detail = public, detail


def check_fab(content: bytes) -> None:
    """Raise :class:`AppRefused` unless ``content`` is the fedmed app this site installed."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(content))
        names = zf.namelist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise AppRefused("the app bundle is not a readable FAB", f"bad zip: {exc}") from None
    extra = sorted(set(names) - _ALLOWED_FILES)
    if extra or "pyproject.toml" not in names or len(names) != len(set(names)):
        raise AppRefused("the app bundle holds files other than pyproject.toml (code is not accepted)",
                         f"bundle files: {names[:20]}")
    info = zf.getinfo("pyproject.toml")
    if info.file_size > _MAX_PYPROJECT:
        raise AppRefused("the app's pyproject.toml is too large", f"{info.file_size} bytes")
    try:
        project = tomllib.loads(zf.read(info).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AppRefused("the app's pyproject.toml does not parse", str(exc)) from None
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components != ALLOWED_COMPONENTS:
        raise AppRefused("the app's components are not the allow-listed fedmed ServerApp and ClientApp",
                         f"components: {components!r}")
    meta = project.get("project", {})
    if meta.get("dependencies", []):
        raise AppRefused("the app declares dependencies", f"dependencies: {meta.get('dependencies')!r}")
    if meta.get("version") != fedmed.__version__:
        raise AppRefused(f"the app's fedmed version differs from this site's ({fedmed.__version__})",
                         f"app version: {meta.get('version')!r}")
