"""mailbox_guard: the SMTP engine, its store, checks, queue and delivery.

The engine never imports textual, typer, ``tui`` or ``cli`` (tests/test_layering.py).
"""

__version__ = "0.1.0"
