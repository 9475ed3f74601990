"""``python -m llmexp.plugins``: the same listing as ``llmexp plugins``."""

import sys

from llmexp.errors import quiet_exits
from llmexp.plugins.listing import main

sys.exit(quiet_exits(main)())
