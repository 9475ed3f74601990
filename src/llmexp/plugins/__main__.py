"""``python -m llmexp.plugins``: the same listing as ``llmexp plugins``."""

import sys

from llmexp.plugins.listing import main

sys.exit(main())
