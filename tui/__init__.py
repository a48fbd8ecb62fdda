"""The Textual dashboard, ``mailbox-guard tui`` (:func:`tui.app.run`).

``app`` (modes and keys), ``feed`` (the one worker that follows the engine),
``source`` (control socket, or the store read-only when the engine is down),
``messages`` (the custom Textual messages), ``screens/`` (one per view) and
``widgets/`` (reusable, each with its own CSS). The engine never imports this
package; this package reaches the engine only through its control client and reads
the store only through ``mailbox_guard.queue``.
"""
