"""W&B sweep files run offline with the open-source sweep engine (``llmexp sweep FILE``)."""
