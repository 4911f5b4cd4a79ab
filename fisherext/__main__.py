"""``python -m fisherext suite ...``: the command line of :mod:`fisherext.cli`."""
import sys

from .cli import main

sys.exit(main())
