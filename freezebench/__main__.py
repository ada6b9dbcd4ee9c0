"""``python -m freezebench``: the same as the ``freezebench`` command."""

import sys

from .cli import main

sys.exit(main())
