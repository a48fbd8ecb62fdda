"""Tests for mailbox_guard.dsn: RFC 3464 bounces built with the email package."""

import email
import email.policy
import random
import re
from datetime import datetime, timezone

import pytest

from mailbox_guard.mail.dsn import FailedRecipient, build_dsn, human_duration, message_id_of

ARRIVAL = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
NOW = datetime(2024, 1, 7, 3, 4, 5, tzinfo=timezone.utc)
LAST = datetime(2024, 1, 7, 2, 0, 0, tzinfo=timezone.utc)
ORIGINAL = (b"From: Alice <alice@sender.test>\r\n"
            b"To: bob@remote.test\r\n"
            b"Subject: Quarterly numbers\r\n"
            b"Message-ID: <orig-1@sender.test>\r\n"
            b"\r\n"
            b"The secret body text.\r\n")
BARE_CR_OR_LF = re.compile(rb"(?<!\r)\n|\r(?!\n)")


def unknown_user(**kw):
    args = dict(recipient="bob@remote.test", status="5.1.1",
                diagnostic="550 5.1.1 <bob@remote.test>: user unknown",
                remote_mta="mx.remote.test", last_attempt=LAST)
    args.update(kw)
    return FailedRecipient(**args)


def make(recipients=None, **kw):
    args = dict(reporting_mta="mx.guard.test", original_sender="alice@sender.test",
                queue_id="4QxYz1", arrival_date=ARRIVAL, now=NOW,
                recipients=[unknown_user()] if recipients is None else recipients,
                original_message=ORIGINAL)
    args.update(kw)
    data = build_dsn(**args)
    assert_wire_clean(data)
    return data, email.message_from_bytes(data, policy=email.policy.default)


def assert_wire_clean(data):
    assert isinstance(data, bytes)
    assert BARE_CR_OR_LF.search(data) is None, "bare CR or LF in output"
    assert data.endswith(b"\r\n")
    longest = max(len(line) for line in data.split(b"\r\n"))
    assert longest <= 998, f"line of {longest} octets"


def report_parts(msg):
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts[:2]] == ["text/plain", "message/delivery-status"]
    assert len(parts) == 3
    return parts


def status_blocks(msg):
    return report_parts(msg)[1].get_payload()


def test_envelope_headers():
    data, msg = make()
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.guard.test"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == "alice@sender.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == NOW
    assert re.fullmatch(r"<[^<>@\s]+@mx\.guard\.test>", msg["Message-ID"])
    assert data.split(b"\r\n\r\n")[0].count(b"\r\nMessage-ID:") == 1


def test_delivery_status_fields():
    rcpts = [unknown_user(),
             FailedRecipient("carol@nullmx.test", "5.1.10", None, None),
             FailedRecipient("dave@slow.test", "4.4.7", "421 4.4.2 timeout", "mx.slow.test")]
    _, msg = make(rcpts)
    per_msg, *blocks = status_blocks(msg)
    assert per_msg["Reporting-MTA"] == "dns; mx.guard.test"
    assert email.utils.parsedate_to_datetime(per_msg["Arrival-Date"]) == ARRIVAL
    assert len(blocks) == 3
    bob, carol, dave = blocks
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.remote.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.test>: user unknown"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]) == LAST
    assert carol["Final-Recipient"] == "rfc822; carol@nullmx.test"
    assert carol["Status"] == "5.1.10"
    assert carol["Remote-MTA"] is None and carol["Diagnostic-Code"] is None
    assert (dave["Status"], dave["Diagnostic-Code"]) == ("4.4.7", "smtp; 421 4.4.2 timeout")


def test_human_readable_part_names_recipient_and_reason():
    _, msg = make()
    text = report_parts(msg)[0].get_content()
    assert "bob@remote.test" in text
    assert "user unknown" in text
    assert "5.1.1" in text


def test_all_delayed_subject():
    _, msg = make([unknown_user(action="delayed", status="4.2.2")])
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert status_blocks(msg)[1]["Action"] == "delayed"
    _, mixed = make([unknown_user(action="delayed", status="4.2.2"), unknown_user()])
    assert mixed["Subject"] == "Undelivered Mail Returned to Sender"


def test_headers_mode_returns_header_section_only():
    data, msg = make()
    returned = report_parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    headers = returned.get_content()
    assert "Subject: Quarterly numbers" in headers
    assert "Message-ID: <orig-1@sender.test>" in headers
    assert b"secret body" not in data


def test_full_mode_returns_whole_message():
    data, msg = make(return_content="full")
    returned = report_parts(msg)[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_content()
    assert inner["Subject"] == "Quarterly numbers"
    assert inner.get_content().splitlines() == ["The secret body text."]
    assert ORIGINAL in data  # carried byte for byte


def test_full_mode_oversize_falls_back_to_headers():
    big = ORIGINAL + b"x" * 70 + b"\r\n" * 2000
    data, msg = make(return_content="full", original_message=big, max_returned_bytes=4096)
    returned = report_parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: Quarterly numbers" in returned.get_content()
    assert b"secret body" not in data


def test_full_mode_normalises_bare_lf():
    original = b"Subject: lf\nX-Odd: 1\r\n\nline one\rline two\n"
    data, msg = make(return_content="full", original_message=original)
    assert report_parts(msg)[2].get_content_type() == "message/rfc822"
    assert b"Subject: lf\r\nX-Odd: 1\r\n\r\nline one\r\nline two\r\n" in data


@pytest.mark.parametrize("body", [b"caf\xc3\xa9 secret body\r\n",
                                  b"y" * 999 + b" secret body\r\n"])
def test_full_mode_falls_back_when_not_7bit_safe(body):
    data, msg = make(return_content="full", original_message=ORIGINAL + body)
    returned = report_parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: Quarterly numbers" in returned.get_content()
    assert b"secret body" not in data


def test_hostile_diagnostic_cannot_inject_fields():
    nasty = ("550 no such user\r\nX-Injected: yes\r\n\r\nAction: delivered\x00\x1b[31m"
             " =?utf-8?q?x=0D=0AAction:_delivered?= " + "A" * 5000)
    data, msg = make([unknown_user(diagnostic=nasty, remote_mta="mx.evil.test\r\nX-Evil: 1")])
    lines = data.split(b"\r\n")
    for bad in (b"X-Injected", b"Action: delivered", b"X-Evil"):
        assert not any(line.startswith(bad) for line in lines), bad
    assert b"\x00" not in data and b"\x1b" not in data
    _, block = status_blocks(msg)
    assert block.get_all("Action") == ["failed"]
    assert block.keys() == ["Final-Recipient", "Action", "Status", "Remote-MTA",
                            "Diagnostic-Code", "Last-Attempt-Date"]
    diag = block["Diagnostic-Code"]
    assert diag.startswith("smtp; 550 no such user X-Injected: yes Action: delivered")
    assert len(diag) <= 520 and diag.endswith("...")
    assert block["Remote-MTA"] == "dns; mx.evil.test X-Evil: 1"
    assert "X-Injected" not in msg and "X-Evil" not in msg


@pytest.mark.parametrize("sender", ["", "<>", "  ", " <> "])
def test_null_sender_raises(sender):
    with pytest.raises(ValueError):
        build_dsn(reporting_mta="mx.guard.test", original_sender=sender, queue_id="Q",
                  arrival_date=ARRIVAL, recipients=[unknown_user()], original_message=ORIGINAL)


def test_caller_mistakes_raise():
    with pytest.raises(ValueError):
        make([])
    with pytest.raises(ValueError):
        make([unknown_user(status="550")])
    with pytest.raises(ValueError):
        make(return_content="body")


JUNK = [
    b"",
    b"\n\n\n",
    b"Subject: no body and no newline",
    b"Subject: bare lf\nFrom: x\n\nbody\n",
    b"Subject: bare cr\rX-A: 1\r\rbody\r",
    b"not a header at all\n\xff\xfe\x00\x80 junk\r\n: empty name\r\nX-\x01ctl: v\r\n\r\nb",
    b"Subject: " + b"\xe9" * 3000 + b"\n\n" + b"z" * 5000,
    bytes(random.Random(1).randrange(256) for _ in range(20000)),
]


@pytest.mark.parametrize("mode", ["headers", "full"])
@pytest.mark.parametrize("original", JUNK, ids=range(len(JUNK)))
def test_odd_originals_still_yield_valid_dsn(original, mode):
    data, msg = make(original_message=original, return_content=mode)
    parts = report_parts(msg)
    assert status_blocks(msg)[1]["Status"] == "5.1.1"
    assert parts[2].get_content_type() in ("text/rfc822-headers", "message/rfc822")
    assert data.isascii() and b"\0" not in data  # 7-bit clean whatever came in
    if mode == "headers":
        assert parts[2].get_content_type() == "text/rfc822-headers"


def test_bare_lf_headers_are_returned():
    _, msg = make(original_message=b"Subject: lf only\nX-Junk: \xff\xfe\n\nsecret body\n")
    headers = report_parts(msg)[2].get_content()
    assert "Subject: lf only" in headers
    assert "X-Junk:" in headers
    assert "secret body" not in headers


def test_returned_headers_are_capped():
    """A bounce never carries more than the limit, whatever the original's headers."""
    from datetime import datetime, timezone
    from mailbox_guard.mail.dsn import FailedRecipient, build_dsn
    huge = b"".join(b"X-Payload-%d: %s\r\n" % (i, b"y" * 900) for i in range(2000)) + b"\r\nbody\r\n"
    data = build_dsn(reporting_mta="gw.test", original_sender="victim@victim.test", queue_id="Q1",
                     arrival_date=datetime.now(timezone.utc),
                     recipients=[FailedRecipient("nobody@example.test", "5.1.1", "550 5.1.1 no", None)],
                     original_message=huge, max_returned_bytes=16384)
    assert len(data) < 24000
    assert b"X-Headers-Truncated: yes" in data


@pytest.mark.parametrize("seconds,text", [(600, "10 minutes"), (5 * 86400, "5 days"), (1, "1 second"),
                                          (0.00694444 * 86400, "10 minutes"), (5400, "1 hour 30 minutes"),
                                          (86400 + 180, "1 day"), (0, "0 seconds")])
def test_human_durations(seconds, text):
    assert human_duration(seconds) == text


def test_a_folded_message_id_is_read_unfolded():
    data, msg = make(queue_id="1A230E0D1D10048A2195")     # a real queue id: a long Message-ID
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"Message-ID:\r\n <" in head            # the generator folds a long header
    assert message_id_of(data) == str(msg["Message-ID"]).strip()
    assert message_id_of(b"Message-ID: <a.b@\r\n example.test>\r\nSubject: x\r\n\r\n") == "<a.b@example.test>"
    assert message_id_of(b"Subject: none\r\n\r\nMessage-ID: <in-the-body@x>\r\n") is None
