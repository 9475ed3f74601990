"""Install the example plugin packages (plugins/*) into the running interpreter, once.

Editable installs, so the tests always exercise the checkout's plugin code, discovered through
the real ``llmexp`` entry points of installed distributions.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import json
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"llmexp-acme-qa": REPO / "plugins" / "llmexp-acme-qa",
            "llmexp-answer-match": REPO / "plugins" / "llmexp-answer-match"}


def installed_from(dist: str, path: Path) -> bool:
    """``dist`` is installed in editable mode from ``path``."""
    try:
        direct = json.loads(md.distribution(dist).read_text("direct_url.json") or "{}")
    except md.PackageNotFoundError:
        return False
    return direct.get("url") == path.resolve().as_uri() and direct.get("dir_info", {}).get("editable", False)


def ensure_installed() -> None:
    """Install what is missing; a lock keeps parallel test workers from installing at once."""
    import tempfile

    from filelock import FileLock

    with FileLock(str(Path(tempfile.gettempdir()) / "llmexp-test-plugins.lock")):
        importlib.invalidate_caches()
        missing = [path for dist, path in PACKAGES.items() if not installed_from(dist, path)]
        if missing:
            _install(missing)
    # Installed now (here, by another worker, or before): read the new .pth files in this process.
    site.addsitedir(sysconfig.get_paths()["purelib"])
    importlib.invalidate_caches()
    from llmexp.plugins import manager

    manager.reset()


def _install(missing: list) -> None:
    # With hatchling here, build offline; without it, pip fetches it from PyPI into an isolated build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation]
    for path in missing:
        cmd += ["-e", str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"installing the example plugins failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
