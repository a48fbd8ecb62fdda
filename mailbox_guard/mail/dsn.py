"""Delivery status notifications (bounces), RFC 3464 / RFC 3462.

Provides :class:`FailedRecipient` (one recipient's outcome) and :func:`build_dsn`,
which renders a complete ``multipart/report; report-type=delivery-status``
message as CRLF-terminated bytes ready for submission with a null envelope
sender.  All MIME work is done by the standard library ``email`` package.
:func:`message_id_of` reads a message's Message-ID (folded or not) and
:func:`human_duration` writes the durations people read ("10 minutes", "5 days").

Anything that came from a remote server or from the original message is treated
as hostile: DSN fields are reduced to single-line printable ASCII and capped in
length, and the original message is line-ending normalised before it is
returned.  Odd original messages never make :func:`build_dsn` raise.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesHeaderParser
from email.policy import SMTP, compat32
from email.utils import format_datetime, make_msgid
from mailbox_guard.text import printable

__all__ = ["FailedRecipient", "build_dsn", "human_duration", "message_id_of"]

# CRLF and 7-bit only, so the DSN can be relayed anywhere without 8BITMIME.
# Output uses refold_source "none" so the plain-string DSN fields below are
# written verbatim: refolding them would run them through the header parser,
# which decodes RFC 2047 encoded words (a remote "=?utf-8?q?=0D=0A...?=" could
# then forge fields).
_POLICY = SMTP.clone(cte_type="7bit")
_OUTPUT_POLICY = _POLICY.clone(refold_source="none")

_MAX_FIELD = 500           # cap for any single DSN field value (well under 998)
_MAX_LINE = 998            # RFC 5322 line limit, CRLF excluded
_ACTIONS = ("failed", "delayed")
_STATUS_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_WS_CTRL_RE = re.compile(r"[\x00-\x20\x7f-\x9f\u2028\u2029]+")
_LINE_CTRL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_EOL_RE = re.compile(rb"\r\n|\r|\n")
_header_parser = BytesHeaderParser(policy=compat32)


@dataclass(frozen=True)
class FailedRecipient:
    """The outcome for one envelope recipient that was not (yet) delivered."""

    recipient: str            # original envelope recipient (RCPT TO address)
    status: str               # enhanced status code, e.g. "5.1.1", "4.4.7"
    diagnostic: str | None    # remote reply text, e.g. "550 5.1.1 user unknown"
    remote_mta: str | None    # host name of the MTA that gave the reply
    action: str = "failed"    # "failed" or "delayed"
    last_attempt: datetime | None = None


def _clean(text: object, limit: int = _MAX_FIELD) -> str:
    """One line of printable ASCII: control/whitespace runs become one space,
    other non-ASCII becomes '?', and the result is capped at ``limit``."""
    text = printable(_WS_CTRL_RE.sub(" ", str(text)).strip(), limit + 1)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _crlf(data: bytes) -> bytes:
    """Normalise bare CR, bare LF and CRLF line endings to CRLF."""
    return _EOL_RE.sub(b"\r\n", data)


def _header_section(data: bytes) -> bytes:
    """Everything before the first empty line of CRLF-normalised ``data``."""
    head = (b"\r\n" + data).split(b"\r\n\r\n", 1)[0][2:].rstrip(b"\r\n")
    return head + b"\r\n" if head else b""


def _fits_verbatim(data: bytes, limit: int) -> bool:
    """Can ``data`` go out unchanged as a 7bit message/rfc822 body?"""
    return (len(data) <= limit and data.isascii() and b"\0" not in data
            and all(len(line) <= _MAX_LINE for line in data.split(b"\r\n")))


def _sender_address(original_sender: str) -> Address:
    sender = (original_sender or "").strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1].strip()
    if not sender:
        raise ValueError("refusing to bounce a message with a null sender")
    try:
        return Address(addr_spec=sender)
    except (ValueError, HeaderParseError) as exc:
        raise ValueError(f"unusable original sender {_clean(sender, 80)!r}") from exc


def _fields(pairs: list[tuple[str, str]]) -> Message:
    """One delivery-status field block; values are stored verbatim (see above)."""
    block = Message()
    for name, value in pairs:
        block[name] = value
    return block


def _recipient_block(r: FailedRecipient) -> Message:
    pairs = [("Final-Recipient", "rfc822; " + _clean(r.recipient)),
             ("Action", r.action), ("Status", r.status)]
    if r.remote_mta and _clean(r.remote_mta):
        pairs.append(("Remote-MTA", "dns; " + _clean(r.remote_mta)))
    if r.diagnostic and _clean(r.diagnostic):
        pairs.append(("Diagnostic-Code", "smtp; " + _clean(r.diagnostic)))
    if r.last_attempt is not None:
        pairs.append(("Last-Attempt-Date", format_datetime(r.last_attempt)))
    return _fields(pairs)


def _human_text(host: str, queue_id: str, recipients: list[FailedRecipient],
                delayed_only: bool) -> str:
    if delayed_only:
        intro = (f"Your message (queue ID {queue_id}) has not yet been delivered to "
                 "the recipients listed below. The mail system will keep trying; "
                 "you do not need to resend it.")
    else:
        intro = (f"Your message (queue ID {queue_id}) could not be delivered to one "
                 "or more recipients. The details are listed below.")
    paras = [f"This is the mail system at host {host}.", textwrap.fill(intro, 76)]
    for r in recipients:
        line = f"<{_clean(r.recipient)}>: {r.action}, status {r.status}"
        if r.remote_mta and _clean(r.remote_mta):
            line += f"; host {_clean(r.remote_mta)}"
        if r.diagnostic and _clean(r.diagnostic):
            line += f" said: {_clean(r.diagnostic)}"
        paras.append(textwrap.fill(line, 76, subsequent_indent="    ",
                                   break_on_hyphens=False))
    return "\n\n".join(paras) + "\n"


def _returned_part(original: bytes, mode: str, limit: int) -> MIMEPart:
    """The third report part: the whole original if wanted and possible, else
    its header section (8-bit junk replaced, control characters as '?')."""
    data = _crlf(original)
    part = MIMEPart(policy=_POLICY)
    if mode == "full" and _fits_verbatim(data, limit):
        part["Content-Type"] = "message/rfc822"
        # A string payload is emitted verbatim by the generator (no re-parse).
        part.set_payload(data.decode("ascii"))
        return part
    head = _header_section(data)
    if len(head) > limit:
        # Never return more than the limit, whatever the headers hold: a bounce is
        # otherwise a way to send megabytes to a forged sender (backscatter).
        cut = head.rfind(b"\r\n", 0, limit)
        head = head[:cut if cut > 0 else limit] + b"\r\nX-Headers-Truncated: yes"
    text = head.decode("utf-8", "replace")
    text = "\n".join(_LINE_CTRL_RE.sub("?", line) for line in text.split("\r\n"))
    part.set_content(text, subtype="rfc822-headers")
    return part


_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def human_duration(seconds: float) -> str:
    """``600`` -> "10 minutes", ``432000`` -> "5 days", ``5400`` -> "1 hour 30 minutes":
    the two largest units, rounded to whole seconds."""
    left = max(0, round(seconds))
    parts = []
    for name, size in _UNITS:
        if left >= size or (name == "second" and not parts):
            n, left = divmod(left, size)
            parts.append(f"{n} {name}{'' if n == 1 else 's'}")
        elif parts:
            break          # "1 day 3 minutes" says less than "1 day"
        if len(parts) == 2:
            break
    return " ".join(parts)


def message_id_of(message: bytes) -> str | None:
    """The Message-ID of a message (raw bytes), unfolded: a msg-id holds no white
    space (RFC 5322 3.6.4), so the folding and any CFWS around it go."""
    value = _header_parser.parsebytes(_header_section(_crlf(message))).get("Message-ID")
    token = "".join(str(value).split()) if value is not None else ""
    return token[:250] if token and token.isascii() and token.isprintable() else None


def build_dsn(*, reporting_mta: str, original_sender: str, queue_id: str,
              arrival_date: datetime, recipients: list[FailedRecipient],
              original_message: bytes, return_content: str = "headers",
              max_returned_bytes: int = 65536, now: datetime | None = None) -> bytes:
    """Build an RFC 3464 DSN for ``recipients`` and return it as CRLF bytes.

    ``return_content`` is "headers" (text/rfc822-headers) or "full"
    (message/rfc822; falls back to headers when the original is larger than
    ``max_returned_bytes`` or cannot be carried unchanged in 7bit: 8-bit bytes,
    NULs or lines over 998 octets).  The output is always 7-bit ASCII.
    Raises ValueError for caller mistakes only: a null/unusable sender, no
    recipients, an unknown action or status, a bad ``return_content`` or
    ``reporting_mta``.
    """
    to_addr = _sender_address(original_sender)
    host = _clean(reporting_mta, 255)
    if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", host):
        raise ValueError(f"bad reporting_mta {host!r}")
    if return_content not in ("headers", "full"):
        raise ValueError(f"return_content must be 'headers' or 'full', not {return_content!r}")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for r in recipients:
        if r.action not in _ACTIONS or not _STATUS_RE.fullmatch(r.status or ""):
            raise ValueError(f"bad action/status {r.action!r}/{r.status!r}")
    delayed_only = all(r.action == "delayed" for r in recipients)
    qid = _clean(queue_id, 64)

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = Address("Mail Delivery System", "MAILER-DAEMON", host)
    msg["To"] = to_addr
    msg["Subject"] = ("Delayed Mail (still being retried)" if delayed_only
                      else "Undelivered Mail Returned to Sender")
    msg["Date"] = now or datetime.now(timezone.utc)
    msg["Message-ID"] = make_msgid(re.sub(r"[^A-Za-z0-9]", "", qid) or None, domain=host)
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/report; report-type=delivery-status"

    notice = MIMEPart(policy=_POLICY)
    notice.set_content(_human_text(host, qid, recipients, delayed_only))
    status = MIMEPart(policy=_POLICY)
    status["Content-Type"] = "message/delivery-status"
    status.set_payload([_fields([("Reporting-MTA", "dns; " + host),
                                 ("Arrival-Date", format_datetime(arrival_date))])]
                       + [_recipient_block(r) for r in recipients])
    returned = _returned_part(bytes(original_message or b""), return_content,
                              max_returned_bytes)
    msg.set_payload([notice, status, returned])
    return msg.as_bytes(policy=_OUTPUT_POLICY)
