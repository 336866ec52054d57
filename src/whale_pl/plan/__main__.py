"""``python -m whale_pl.plan``: the same as ``whale plan``."""

from whale_pl.plan.cli import main

raise SystemExit(main())
