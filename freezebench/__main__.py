"""``python -m freezebench``: the same as the ``freezebench`` command."""

from .cli import run

run()
