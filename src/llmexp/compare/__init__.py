"""``llmexp compare RUN_DIR... | GLOB``: finished runs side by side, offline (see __main__)."""
