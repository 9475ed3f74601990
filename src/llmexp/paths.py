"""Where llmexp's shipped files live, in a wheel and in a source checkout."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


def config_dir() -> Path:
    """conf/ ships inside the wheel as llmexp/conf; in a checkout it is the top-level conf/.
    Registers the schemas' defaults with Hydra first (llmexp.config.defaults)."""
    from llmexp.config.defaults import register

    register()  # the schemas' defaults, which conf/ composes first
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("llmexp's conf/ directory is missing from the installation")


def config_groups() -> dict:
    """Config group name -> sorted option names, read from conf/ and plugins' config directories
    (no Hydra import). Loads the plugins, so a broken one is reported here."""
    from llmexp.plugins.configs import with_plugin_options

    root = config_dir()
    return with_plugin_options({
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_"))
    })
