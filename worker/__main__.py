"""``python -m worker``: the same as the ``convsync`` console script."""

from worker.cli import main

raise SystemExit(main())
