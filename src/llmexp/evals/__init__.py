"""Evaluation: lm-evaluation-harness on the in-memory model, bundled offline tasks, plugin evals."""
