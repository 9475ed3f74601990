"""The `llmexp <name> ...` commands besides a run."""

# Each module's main(argv) -> exit code, imported only when asked for (so that a run, --help and
# the other commands do not pay for its imports).
SUBCOMMANDS = {
    "sweep": "llmexp.sweep.__main__:main",
    "pipeline": "llmexp.pipeline:main",
    "compare": "llmexp.compare.__main__:main",
    "export": "llmexp.export_command:main",
    "prepare": "llmexp.prepare_corpus:main",
    "serve": "llmexp.serving.server:main",
    "plugins": "llmexp.plugins.listing:main",
    "generate": "llmexp.generate:main",
    "eval": "llmexp.evals.__main__:main",
}
