"""``python -m whale_pl.plan``: the same as ``whale plan``."""

import sys

from whale_pl.plan.cli import main

sys.exit(main())
