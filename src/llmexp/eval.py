"""``python -m llmexp.eval``: see llmexp.evals.__main__ (kept short so both names work)."""

import sys

from llmexp.evals.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
