"""``python -m anycnn`` runs the command-line interface."""

import sys

from .cli.commands import main

sys.exit(main())
