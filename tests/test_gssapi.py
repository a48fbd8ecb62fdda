"""GSSAPI against a real MIT Kerberos KDC started on loopback: a ticket for
alice@EXAMPLE.TEST logs in as alice@example.test over STARTTLS; without a keytab
GSSAPI is not offered and `status` says why; a file that is not a keytab is refused."""

from __future__ import annotations

import base64
import json
import smtplib
import ssl

import gssapi                 # the test extra; `./run test` installs it (and libkrb5-dev first)
import pytest

from tests.conftest import free_port, make_message
from tests.kdc import KDC, REALM

SERVICE = f"smtp/gw.test@{REALM}"


@pytest.fixture
def kdc(tmp_path, monkeypatch):
    k = KDC(tmp_path / "kdc")
    (tmp_path / "kdc").mkdir()
    k.start()
    for key in ("KRB5_CONFIG", "KRB5CCNAME", "KRB5_KDC_PROFILE"):
        monkeypatch.setenv(key, k.env[key])
    yield k
    k.stop()


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def gssapi_login(s: smtplib.SMTP, authzid: str = "") -> tuple[int, bytes]:
    """The client side of RFC 4752 with the gssapi package and our ticket cache."""
    target = gssapi.Name(SERVICE, gssapi.NameType.kerberos_principal)
    ctx = gssapi.SecurityContext(name=target, usage="initiate", flags=[gssapi.RequirementFlag.mutual_authentication])
    token = ctx.step()
    code, resp = s.docmd("AUTH", "GSSAPI " + base64.b64encode(token).decode())
    while code == 334 and not ctx.complete:
        token = ctx.step(base64.b64decode(resp))
        code, resp = s.docmd(base64.b64encode(token or b"").decode())
    if code != 334:
        return code, resp
    # Security layer negotiation: take "none", name the authorisation identity.
    offer = ctx.unwrap(base64.b64decode(resp)).message
    assert offer[0] & 1
    answer = ctx.wrap(b"\x01\x00\x00\x00" + authzid.encode(), False).message
    return s.docmd(base64.b64encode(answer).decode())


@pytest.fixture
def kgw(gateway, sink, kdc):
    gateway.env.update({k: kdc.env[k] for k in ("KRB5_CONFIG", "KRB5_KDC_PROFILE")})
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.cli("users", "add", "alice@example.test", "--password-stdin", input="Corr3ct-Horse-Battery\n")
    kdc.add_user("alice", "alice-Kerberos-1")
    keytab = kdc.folder / "smtp.keytab"
    kdc.add_service(SERVICE, keytab)
    gateway.cli("auth", "gssapi", "--keytab", str(keytab), "--principal", SERVICE)
    gateway.sub_port = free_port()
    gateway.start("--submission", f"127.0.0.1:{gateway.sub_port}")
    kdc.kinit("alice", "alice-Kerberos-1")
    return gateway


def test_gssapi_login_with_a_real_kdc(kgw, sink):
    status = json.loads(kgw.cli("status", "--json").stdout)
    assert status["gssapi"]["offered"] is True
    with smtplib.SMTP("127.0.0.1", kgw.sub_port, timeout=10) as s:
        s.ehlo()
        s.starttls(context=insecure())
        s.ehlo()
        assert "GSSAPI" in s.esmtp_features["auth"].split()
        code, _ = gssapi_login(s)
        assert code == 235
        s.sendmail("alice@example.test", ["bob@example.test"], make_message(sender="alice@example.test"))
    assert sink.wait_for(1)[0].mail_from == "alice@example.test"
    assert "authenticated alice@example.test with GSSAPI" in kgw.log()


def test_gssapi_refuses_another_authorisation_identity(kgw):
    with smtplib.SMTP("127.0.0.1", kgw.sub_port, timeout=10) as s:
        s.ehlo()
        s.starttls(context=insecure())
        s.ehlo()
        assert gssapi_login(s, authzid="bob@example.test")[0] == 535


def test_without_keytab_gssapi_is_not_offered_and_status_says_why(gateway):
    gateway.sub_port = free_port()
    gateway.start("--submission", f"127.0.0.1:{gateway.sub_port}")
    status = json.loads(gateway.cli("status", "--json").stdout)
    assert status["gssapi"]["offered"] is False and "keytab" in status["gssapi"]["reason"]
    with smtplib.SMTP("127.0.0.1", gateway.sub_port, timeout=10) as s:
        s.ehlo()
        s.starttls(context=insecure())
        s.ehlo()
        assert "GSSAPI" not in s.esmtp_features.get("auth", "")
        assert s.docmd("AUTH", "GSSAPI")[0] == 504


@pytest.mark.parametrize("content", [b"", b"smtp/gw.test@EXAMPLE.TEST secret\n", b"\x05\x02",
                                     b"\x05\x02\x00\x00\x00\x40short", b"\x05\x02\xff\xff\xff\xf8" + bytes(8)],
                         ids=["empty", "text", "no-keys", "truncated", "only-a-hole"])
def test_a_file_that_is_not_a_keytab_is_refused(gateway, content):
    bogus = gateway.home.parent / "bogus.keytab"
    bogus.write_bytes(content)
    out = gateway.cli("auth", "gssapi", "--keytab", str(bogus), "--principal", SERVICE, check=False)
    assert out.returncode == 1, out
    assert len(out.stderr.strip().splitlines()) == 1 and "keytab" in out.stderr and "Traceback" not in out.stderr
    assert not (gateway.home / "gssapi.keytab").exists()
    assert "smtp/gw.test" not in gateway.cli("config", "show", "--json").stdout
