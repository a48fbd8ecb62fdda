"""Row tables keyed by id: a refresh updates cells in place and keeps the cursor on
the same row (a live list that jumps under the cursor invites a kill of the wrong
connection)."""

from __future__ import annotations

from typing import Any, Iterable

from rich.text import Text
from textual.widgets import DataTable

from ..format import plain, relative, tls_label, duration

Cells = list[Any]


class KeyedTable(DataTable):
    DEFAULT_CSS = """
    KeyedTable {
        height: 1fr;
    }
    """

    COLUMNS: tuple[tuple[str, str, int | None], ...] = ()   # (key, label, width)

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("cursor_type", "row")
        kwargs.setdefault("zebra_stripes", False)
        super().__init__(**kwargs)
        self._rows: dict[str, dict] = {}

    def on_mount(self) -> None:
        for key, label, width in self.COLUMNS:
            self.add_column(label, key=key, width=width)

    # ------------------------------------------------------------ keys and rows
    @property
    def current_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:        # the cursor is past the end during a refresh
            return None

    @property
    def current_row(self) -> dict | None:
        key = self.current_key
        return self._rows.get(key) if key is not None else None

    def row_data(self, key: str) -> dict | None:
        return self._rows.get(key)

    def cells(self, row: dict) -> Cells:
        raise NotImplementedError

    def sync(self, rows: Iterable[tuple[str, dict]]) -> None:
        """Show exactly these rows, in this order."""
        rows = list(rows)
        wanted = [key for key, _ in rows]
        current = self.current_key
        self._rows = dict(rows)
        have = [r.key.value for r in self.ordered_rows]
        columns = [key for key, _, _ in self.COLUMNS]
        if have == wanted:
            for key, row in rows:
                old = self.get_row(key)
                for column, before, after in zip(columns, old, self.cells(row)):
                    if before != after:
                        self.update_cell(key, column, after)
            return
        self.clear()
        for key, row in rows:
            self.add_row(*self.cells(row), key=key)
        if current in wanted:
            self.move_cursor(row=wanted.index(current), animate=False)


class ConnectionTable(KeyedTable):
    COLUMNS = (("remote", "Remote", 21), ("helo", "HELO", 17), ("user", "User", 8),
               ("phase", "Phase", 7), ("tls", "TLS", 7), ("age", "Age", 7))

    def cells(self, row: dict) -> Cells:
        ip, port = row.get("peer_ip") or "?", row.get("peer_port")
        remote = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        return [Text(remote), plain(row.get("helo"), 60), plain(row.get("user"), 60),
                Text(str(row.get("phase") or "-")), Text(tls_label(row.get("tls"))),
                Text(duration(row.get("age")), justify="right")]


STATE_STYLES = {"deferred": "yellow", "hold": "magenta", "quarantine": "bold magenta", "bounced": "red",
                "active": "cyan", "delivered": "green", "incoming": ""}


class MessageTable(KeyedTable):
    COLUMNS = (("id", "ID", 20), ("state", "State", 9), ("from", "From", 17), ("to", "To", 17),
               ("age", "Age", 6))

    def __init__(self, clock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock

    def cells(self, row: dict) -> Cells:
        state = row.get("state") or "-"
        now = self.clock()
        age = relative(row.get("received_at"), now).removesuffix(" ago")
        return [Text(str(row.get("id"))), Text(state, style=STATE_STYLES.get(state, "")),
                plain(row.get("mail_from") if row.get("mail_from") != "" else "<>", 120),
                plain(row.get("recipients"), 200), Text(age, justify="right")]


class QuarantineTable(MessageTable):
    """Quarantined messages: why they were kept back instead of a state (all share one)."""

    COLUMNS = (("id", "ID", 20), ("from", "From", 17), ("to", "To", 13), ("reason", "Reason", 13),
               ("age", "Age", 6))

    def cells(self, row: dict) -> Cells:
        id_, _, sender, to, age = super().cells(row)
        return [id_, sender, to, plain(row.get("reason"), 200), age]


KIND_STYLES = {"ip": "cyan", "user": "magenta"}


def ban_row_key(row: dict) -> str:
    """A ban is one (kind, key): an address and a login may read the same."""
    return f"{row.get('kind')}:{row.get('key')}"


class BanTable(KeyedTable):
    """Brute-force bans in force: kind, key (an address or a login), failures, and the
    time left by the app's clock (recomputed at every refresh)."""

    COLUMNS = (("kind", "Kind", 4), ("key", "Banned address or user", 40), ("failures", "Failures", 8),
               ("left", "Time left", 9))

    def __init__(self, clock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock

    def cells(self, row: dict) -> Cells:
        kind = str(row.get("kind") or "-")
        left = (row.get("until") or 0) - self.clock()
        return [Text(kind, style=KIND_STYLES.get(kind, "")), plain(row.get("key"), 120),
                Text(str(row.get("failures") if row.get("failures") is not None else "-"), justify="right"),
                Text(duration(left) if left > 0 else "expired", justify="right")]
