"""``python -m drainbus``: the same as the ``drainbus`` command."""

from drainbus.cli import main

main()
