"""llmexp-acme-qa: questions and answers about the ACME product catalogue, as an llmexp dataset."""

__version__ = "0.1.0"
