"""Checks: one module per check, named by phase (``rcpt_relay``, ...).

A check is ``async run(ctx) -> list[Result]`` with a name, the phases it serves and a
timeout. It returns facts; it never writes SMTP replies or the database.
"""
