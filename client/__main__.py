"""`python -m client ...`: see client.cli."""

from .cli import main

raise SystemExit(main())
