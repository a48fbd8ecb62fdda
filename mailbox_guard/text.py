"""The one sanitiser of untrusted text (client commands, addresses, headers, logins,
remote replies) before it goes into a reply line, a log line, a header of ours or
the trace: printable ASCII only, everything else a ``?``, and a length bound."""

from __future__ import annotations


def printable(text: str, limit: int = 255, *, spaces: bool = True) -> str:
    """``text`` as printable ASCII of at most ``limit`` characters; with
    ``spaces=False`` the space is replaced too (for one token, an address)."""
    low = 32 if spaces else 33
    if text.isascii() and text.isprintable() and (spaces or " " not in text):
        return text[:limit]
    return "".join(c if low <= ord(c) < 127 else "?" for c in text[:limit])
