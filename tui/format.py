"""Small formatters shared by the screens and widgets. Everything that comes from the
network (HELO names, addresses, headers) is turned into a plain :class:`Text`, never
parsed as markup: a sender does not get to style, or crash, the dashboard."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text


def plain(value: Any, limit: int = 200, style: str = "") -> Text:
    """Untrusted text for a table cell or a label: no markup, control characters
    shown as '?', cut at ``limit`` characters."""
    if value is None or value == "":
        return Text("-", style="dim")
    text = str(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text[:limit + 1])
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return Text(text, style=style)


def clock_time(ts: float | None, now: float | None = None) -> str:
    """Local wall-clock time, with the date when it is not the day of ``now``."""
    if not ts:
        return "-"
    t = time.localtime(ts)
    today = time.localtime(now if now is not None else time.time())
    if (t.tm_year, t.tm_yday) == (today.tm_year, today.tm_yday):
        return time.strftime("%H:%M:%S", t)
    return time.strftime("%m-%d %H:%M", t)


def duration(seconds: float | None) -> str:
    """A compact, human duration: 45s, 3m12s, 2h05m, 3d04h."""
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def relative(ts: float | None, now: float) -> str:
    """'3m12s ago' or 'in 5m00s'."""
    if not ts:
        return "-"
    delta = ts - now
    return f"in {duration(delta)}" if delta > 0 else f"{duration(-delta)} ago"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n}B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f}K"
    return f"{n / (1024 * 1024):.1f}M"


def tls_label(tls: Any) -> str:
    if not tls:
        return "-"
    if isinstance(tls, dict):
        return str(tls.get("version") or tls.get("protocol") or "yes")
    return "yes" if tls is True else str(tls)


def plain_block(value: str | None, limit: int = 65536) -> Text:
    """Untrusted multi-line text (message headers): lines kept, tabs kept, other
    control characters shown as '?', never markup."""
    if not value:
        return Text("")
    text = value[:limit].replace("\r\n", "\n")
    return Text("".join(ch if ch.isprintable() or ch in "\n\t" else "?" for ch in text))
