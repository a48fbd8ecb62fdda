"""Typed settings: the one table of tunables, their defaults, parsing and help.

Settings live in the store's ``settings`` table as text; this module gives each a
type, a default, a validator and a sentence of help, and turns the table into an
immutable :class:`Settings` object that is part of the policy snapshot. Nothing here
is module-level mutable state.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class SettingError(ValueError):
    """A setting name or value the admin gave is not acceptable (one clear line)."""


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"5m"``, ``"4h"``, ``"5d"``, ``"250ms"`` -> seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise SettingError(f"not a duration: {text!r} (use e.g. 30s, 5m, 4h, 5d)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_schedule(text: str) -> tuple[float, ...]:
    """A retry schedule: comma-separated durations; the last one repeats."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise SettingError("a retry schedule needs at least one duration")
    values = tuple(parse_duration(p) for p in parts)
    if any(v <= 0 for v in values):
        raise SettingError("retry intervals must be positive")
    return values


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, or a bare host when ``default_port`` is given."""
    text = str(text).strip()
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SettingError(f"bad address {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise SettingError(f"bad address {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise SettingError(f"missing host in {text!r}")
    if port_text is None:
        if default_port is None:
            raise SettingError(f"missing port in {text!r} (use HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise SettingError(f"bad port in {text!r}")
    return host, int(port_text)


def check_host(host: str) -> str:
    """A host as an admin gives it: an IP address (dotted digits must be a valid IPv4
    address, anything with a colon a valid IPv6 one) or a host name; returned as given
    (lower-cased). Raises :class:`SettingError` naming what is wrong."""
    text = str(host).strip()
    if ":" in text or re.fullmatch(r"[0-9.]+", text):
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise SettingError(f"not an IP address: {text!r}") from None
    return _hostname(text)


def parse_endpoint(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """:func:`parse_hostport` with the host checked by :func:`check_host`."""
    host, port = parse_hostport(text, default_port=default_port)
    return check_host(host), port


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise SettingError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise SettingError(f"{value} is outside {lo}..{hi}")
        return value
    return parse


def _float_range(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = parse_duration(text)
        if not lo <= value <= hi:
            raise SettingError(f"{text} is outside {format_duration(lo)}..{format_duration(hi)}")
        return value
    return parse


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise SettingError(f"not yes or no: {text!r}")


def _threshold(text: str) -> float | None:
    """A score, or "off" (None): the action is never taken by score."""
    value = str(text).strip().lower()
    if value in ("off", "none", ""):
        return None
    try:
        number = float(value)
    except ValueError:
        raise SettingError(f"not a score or 'off': {text!r}") from None
    if not -1000 <= number <= 1000:
        raise SettingError(f"{text} is outside -1000..1000")
    return number


def _subject_prefix(text: str) -> str:
    value = str(text)
    if len(value) > 64 or not all(32 <= ord(c) < 127 for c in value):
        raise SettingError("a subject prefix is at most 64 printable ASCII characters")
    return value


def _hostname(text: str) -> str:
    text = str(text).strip().rstrip(".").lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", text):
        raise SettingError(f"not a host name: {text!r}")
    return text


def _nameservers(text: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        host, port = parse_hostport(part, default_port=53)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise SettingError(f"a name server must be an IP address: {host!r}") from None
        out.append((host, port))
    return tuple(out)


@dataclass(frozen=True)
class Setting:
    key: str
    default: str
    parse: Callable[[str], Any]
    help: str
    scoped: bool = False          # may be set per domain or per user too (user > domain > server)


def _default_hostname() -> str:
    try:
        return _hostname(socket.getfqdn() or "localhost")
    except SettingError:
        return "localhost"


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("smtp.hostname", "", lambda t: _hostname(t) if t else _default_hostname(),
            "Name in the banner, EHLO reply, Received: and bounces (empty: this host's FQDN)."),
    Setting("smtp.max_message_size", "10240000", _int(1024, 2**31 - 1),
            "Largest message accepted, in bytes; advertised in EHLO SIZE and enforced while reading."),
    Setting("smtp.max_recipients", "1000", _int(1, 100000),
            "Recipients per message; more get 452 4.5.3."),
    Setting("smtp.max_connections", "1000", _int(1, 100000),
            "Simultaneous SMTP sessions in all; more get 421 before any command."),
    Setting("smtp.max_connections_per_ip", "50", _int(1, 100000),
            "Simultaneous sessions from one client address (trusted networks are exempt)."),
    Setting("smtp.max_hops", "50", _int(5, 500),
            "Received: headers a message may carry; more is a mail loop (554 5.4.6)."),
    Setting("smtp.timeout", "300s", _float_range(1, 3600),
            "Idle time allowed between client commands or data chunks (RFC 5321: 5 minutes)."),
    Setting("smtp.tls_handshake_timeout", "10s", _float_range(1, 300),
            "Time allowed for a TLS handshake (STARTTLS or SMTPS); then the connection is closed."),
    Setting("smtp.soft_error_limit", "10", _int(1, 1000),
            "After this many error replies in a session, each further reply is delayed."),
    Setting("smtp.hard_error_limit", "20", _int(1, 1000),
            "After this many error replies the session is ended with 421."),
    Setting("smtp.error_sleep", "1s", _float_range(0, 60),
            "Delay added to replies once the soft error limit is passed."),
    Setting("smtp.delay_reject", "yes", _bool,
            "Refusals found at CONNECT, HELO and MAIL by non-gate checks are answered at RCPT "
            "(Postfix's smtpd_delay_reject), so that per-recipient exceptions such as postmaster@ "
            "still apply; no: answered at once (CONNECT: instead of the banner)."),
    Setting("actions.tag", "6", _threshold,
            "Score from which a message is tagged: X-Spam-Flag, X-Spam-Score and X-Spam-Symbols "
            "headers, and actions.subject_prefix (off: never).", scoped=True),
    Setting("actions.quarantine", "off", _threshold,
            "Score from which a message is quarantined (queue state quarantine) instead of delivered "
            "(off: never).", scoped=True),
    Setting("actions.tempfail", "off", _threshold,
            "Score from which a message is refused with 451 so that the sender retries, as rspamd's "
            "greylist action (off: never).", scoped=True),
    Setting("actions.reject", "15", _threshold,
            "Score from which a message is rejected with 550 (at RCPT when reached before DATA; "
            "off: never).", scoped=True),
    Setting("actions.subject_prefix", "", _subject_prefix,
            "Put before the Subject of a tagged message, e.g. [SPAM] (empty: the subject is left alone).",
            scoped=True),
    Setting("auth.session_failures", "3", _int(1, 100),
            "AUTH failures in one session before it is closed with 421."),
    Setting("auth.ban_after", "10", _int(0, 100000),
            "AUTH failures from one client address within auth.ban_window before a ban (0: never)."),
    Setting("auth.net_ban_after", "30", _int(0, 100000),
            "AUTH failures from one network (/24, /64) within auth.ban_window before it is banned (0: never)."),
    Setting("auth.penalty_after", "5", _int(0, 100000),
            "AUTH failures for one login within auth.ban_window after which addresses it never "
            "logged in from wait before each try (doubling up to auth.penalty_max; 0: never). No account is locked."),
    Setting("auth.penalty_max", "15s", _float_range(0, 300),
            "Longest wait imposed on a try for a login under attack."),
    Setting("auth.ban_window", "1h", _float_range(1, 30 * 86400),
            "Window in which AUTH failures are counted."),
    Setting("auth.ban_time", "1h", _float_range(1, 365 * 86400),
            "How long a ban lasts; `mailbox-guard auth unban` ends it early."),
    Setting("auth.gssapi_principal", "", lambda t: str(t).strip(),
            "Kerberos service principal for GSSAPI, e.g. smtp/mail.example.org@EXAMPLE.ORG."),
    Setting("queue.retry_schedule", "1m,5m,15m,1h,4h", parse_schedule,
            "Delays between delivery attempts; the last one repeats."),
    Setting("queue.max_lifetime", "5d", _float_range(1, 60 * 86400),
            "A message still undelivered after this long is returned to its sender."),
    Setting("queue.keep_done", "7d", _float_range(0, 365 * 86400),
            "How long delivered and bounced messages keep their record and verdict trace."),
    Setting("delivery.concurrency", "20", _int(1, 1000),
            "Messages delivered at the same time."),
    Setting("delivery.destination_concurrency", "10", _int(1, 1000),
            "Transactions to one next hop address at the same time (a burst waits for them)."),
    Setting("delivery.port", "25", _int(1, 65535),
            "TCP port of MX hosts (next hops name their own port)."),
    Setting("delivery.connect_timeout", "30s", _float_range(0.1, 600),
            "Time allowed to connect to a next hop and read its banner."),
    Setting("delivery.command_timeout", "300s", _float_range(0.1, 3600),
            "Time allowed for each reply of the next hop."),
    Setting("dns.nameservers", "", _nameservers,
            "Name servers as IP[:port], comma-separated (empty: /etc/resolv.conf)."),
    Setting("dns.timeout", "5s", _float_range(0.1, 60),
            "Deadline of one DNS lookup."),
    Setting("engine.drain_timeout", "30s", _float_range(0, 3600),
            "On SIGTERM, how long sessions in flight may take to finish."),
    Setting("store.busy_timeout", "5s", _float_range(0.05, 120),
            "How long a write waits for a locked store before the client gets 451."),
)}


def parse_setting(key: str, value: str) -> Any:
    """Validate one setting (raises :class:`SettingError` with one clear line)."""
    if key not in SETTINGS:
        raise SettingError(f"unknown setting {key!r}; `mailbox-guard config list` shows them")
    return SETTINGS[key].parse(value)


class Settings:
    """Immutable, parsed view of the settings table (defaults filled in)."""

    __slots__ = ("_values", "_raw")

    def __init__(self, raw: Mapping[str, str] | None = None) -> None:
        raw = dict(raw or {})
        values: dict[str, Any] = {}
        for key, setting in SETTINGS.items():
            text = raw.get(key, setting.default)
            try:
                values[key] = setting.parse(text)
            except SettingError:
                # A bad value written behind our back must not stop the engine:
                # fall back to the default (the CLI refuses bad values up front).
                values[key] = setting.parse(setting.default)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_raw", raw)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings are immutable")

    def raw(self, key: str) -> str:
        return self._raw.get(key, SETTINGS[key].default)

    def items(self):
        return self._values.items()
