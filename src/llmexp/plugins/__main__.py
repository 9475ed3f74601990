"""``python -m llmexp.plugins``: the same listing as ``llmexp plugins``."""

import sys

from llmexp.errors import reader_may_stop_early
from llmexp.plugins.listing import main

sys.exit(reader_may_stop_early(main)())
