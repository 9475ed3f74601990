"""The hooks a plugin may implement — declarations only; llmexp's own built-ins use the same ones.

Implement a hook with a function of the same name marked ``@llmexp.hookimpl`` in the module
that your distribution names in its ``[project.entry-points.llmexp]`` table. A hookimpl may
take fewer arguments than the spec (pluggy passes only the ones it names), never other ones.

Every hook below is *collected*: llmexp calls each plugin's implementation and keeps all
results (no first-result-wins hook exists yet). Registry hooks return sequences of
declarations from :mod:`llmexp.plugins.declarations`; a name declared twice — by two
plugins, or by a plugin and llmexp itself — is an error naming both.

Keep plugin modules cheap to import: llmexp imports them for ``--help`` and config checks.
Import heavy libraries (torch, transformers, datasets) inside builders, runners and hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

from llmexp.plugins.markers import hookspec

if TYPE_CHECKING:
    from llmexp.config.schema import RunConfig
    from llmexp.plugins.declarations import DatasetDeclaration, EvalDeclaration, RewardDeclaration, ToolDeclaration


@hookspec
def llmexp_datasets() -> Sequence["DatasetDeclaration"]:
    """Datasets this plugin provides.

    Called: once per process, the first time a dataset is looked up (config validation, column
    peeking, loading). Results: collected from every plugin.
    A dataset becomes selectable as ``data=<option>`` once a config file ``data/<option>.yaml``
    with ``source: bundled`` and ``name: <dataset name>`` is contributed (see
    :func:`llmexp_config_dirs`); its ``data.options`` are validated against the declaration's
    ``options`` dataclass.

    Since 0.1.
    """


@hookspec
def llmexp_evals() -> Sequence["EvalDeclaration"]:
    """Evaluations this plugin provides, selectable by name in the eval group.

    Called: once per process, the first time an eval is looked up. Results: collected.

    Since 0.1.
    """


@hookspec
def llmexp_rewards() -> Sequence["RewardDeclaration"]:
    """Named reward functions for the ppo and grpo stages.

    Called: once per process, the first time a reward is looked up. Results: collected.

    Since 0.1.
    """


@hookspec
def llmexp_tools() -> Sequence["ToolDeclaration"]:
    """Named functions the rollout stages (grpo, rloo) let the policy call while it answers
    (``stage.rollout.tools=[name, ...]``).

    Called: once per process, the first time a tool is looked up. Results: collected.

    Since 0.1.
    """


@hookspec
def llmexp_callbacks(cfg: "RunConfig") -> Sequence[Any]:
    """Extra Lightning callbacks for the run described by ``cfg`` (the typed, validated config).

    Called: once per training run, just before the Trainer is built. Results: collected, in
    plugin registration order; return an empty list to add nothing for this run.

    Since 0.1.
    """


@hookspec
def llmexp_config_dirs() -> Sequence[Union[str, Path]]:
    """Directories laid out like llmexp's ``conf/`` (``data/acme_qa.yaml``, ``eval/...``).

    Their options join llmexp's config groups: they compose, validate, and are listed by
    ``--help`` like built-in ones. Only existing groups may be extended, and an option name
    already taken (by llmexp or another plugin) is an error naming both.
    Called: once per process, when the config groups are first read. Results: collected.

    Since 0.1.
    """
