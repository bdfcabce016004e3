"""``python -m relay``: the same as the ``relay`` command."""

from relay.tools.cli import main

raise SystemExit(main())
