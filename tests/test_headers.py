"""The header view the checks read (mail.message.Headers) gives what email's parser
gives (compat32), for the headers as they arrive, odd ones included."""

from __future__ import annotations

import email.parser
import email.policy

import pytest

from mailbox_guard.mail.message import Headers

SECTIONS = [
    b"Subject: hello\r\nFrom: a@b.test\r\n\r\n",
    b"Received: from x\r\n\tby y; Mon, 1 Jan 2026\r\nReceived: from z\r\n by w\r\nsubject:  two  spaces \r\n\r\n",
    b"Message-ID: <abc@x.test>\r\nMESSAGE-id: <second@x.test>\r\n\r\n",
    b"Authentication-Results: gw.test;\r\n spf=pass\r\nX-Empty:\r\nX-Tab:\tvalue\r\n\r\n",
    b"From bob@x.test Mon Jan  1 12:00:00 2026\r\nSubject: mbox line first\r\n\r\n",
    b"Subject: a\r\nthis line has no colon\r\nX-After: hidden\r\n\r\n",
    b" leading continuation\r\nSubject: x\r\n\r\n",
    b"Subject : space before colon\r\nX-Next: y\r\n\r\n",
    b"Subject: bare lf\nX-Other: cr\rX-Last: z\r\n\r\n",
    b"Subject: caf\xc3\xa9 8bit\r\nX-A: b\r\n\r\n",
    b"Subject: unterminated",
    b"",
    b"X-Colons: a:b:c\r\nX-Long: " + b"w " * 600 + b"\r\n\r\n",
]


def _values(values):
    return None if values is None else [str(v) for v in values]


@pytest.mark.parametrize("section", SECTIONS, ids=range(len(SECTIONS)))
def test_headers_read_like_email_parser(section):
    ours = Headers(section)
    theirs = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(section)
    assert ours.keys() == theirs.keys()
    for name in {n.lower() for n in theirs.keys()} | {"subject", "received", "message-id", "x-none"}:
        assert _values(ours.get_all(name)) == _values(theirs.get_all(name)), name
        assert str(ours.get(name)) == str(theirs.get(name)), name
        assert (name in ours) == (name in theirs), name
