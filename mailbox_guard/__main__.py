"""``python -m mailbox_guard``: the same command line as ``mailbox-guard``."""

from cli.app import main

main()
