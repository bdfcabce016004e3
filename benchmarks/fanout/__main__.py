"""``python -m benchmarks.fanout``: what ``benchmarks/run`` runs once it has prepared."""

import sys

from benchmarks.fanout.cli import main

sys.exit(main())
