"""The Textual dashboard (live connections, queue, quarantine); built on the engine's
control socket in the operator-surfaces issue."""
