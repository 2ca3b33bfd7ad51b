"""`python -m hearth_agent` runs the CLI, for checkouts where the console script is not installed."""

from hearth_agent.cli import main

raise SystemExit(main())
