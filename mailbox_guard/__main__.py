"""``python -m mailbox_guard``: runs the installed ``mailbox-guard`` command.

The engine does not know where its command line lives (it never imports the CLI):
the command is found through the package's console-script entry point.
"""

import sys
from importlib.metadata import entry_points

_commands = entry_points(group="console_scripts", name="mailbox-guard")
if not _commands:
    sys.exit("mailbox-guard: the command is not installed (pip install . or ./run cli ...)")
sys.exit(next(iter(_commands)).load()())
