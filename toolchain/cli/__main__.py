"""``python -m toolchain.cli``: the same as the ``edgefleet`` command."""

from toolchain.cli import main

main()
