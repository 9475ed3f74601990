"""Hydra SearchPathPlugin: config directories of llmexp plugins join llmexp's config search path.

Hydra finds this module in the ``hydra_plugins`` namespace package. Only a search path whose
primary config is llmexp's own ``conf/`` is extended, so other Hydra apps are left alone.
Options listing (``--help``) only sees search paths added this way, not ``hydra.searchpath``.
"""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LlmexpPluginConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from llmexp.paths import config_dir

        if not any(_is_llmexp_conf(e.path, config_dir()) for e in search_path.get_path()):
            return
        from llmexp.plugins.configs import plugin_config_dirs

        for info, directory in plugin_config_dirs():
            search_path.append(provider=f"llmexp-plugin-{info.name}", path=f"file://{directory}")


def _is_llmexp_conf(path, conf: Path) -> bool:
    """``path`` is llmexp's conf/ as Hydra spells it: pkg://llmexp.conf, file://DIR or a bare DIR."""
    if not path or path.startswith("pkg://"):
        return path in ("pkg://llmexp.conf", "pkg://llmexp/conf")
    local = path[len("file://"):] if path.startswith("file://") else path
    return "://" not in local and Path(local).resolve() == conf.resolve()
