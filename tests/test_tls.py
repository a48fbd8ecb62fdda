"""TLS on every listener with a throwaway CA (trustme): certificates verified by the
client, TLS 1.0/1.1 refused, nothing pipelined before STARTTLS runs after it, a new
certificate (RSA or ECDSA, over STARTTLS and SMTPS) is used by the next connection
without a restart, SMTPS from the first byte, TLS facts in the verdict trace, and a
certificate for a listener that does not exist is refused."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
import warnings

import pytest
import trustme

from tests.conftest import free_port, make_message


PASSWORD = "Corr3ct-Horse-Battery"


def add_user(gw, name: str, password: str = PASSWORD) -> None:
    gw.cli("users", "add", name, "--password-stdin", input=password + "\n")


@pytest.fixture
def ca():
    return trustme.CA()


def install(gw, ca, name: str = "gw.test", listener: str | None = None, check: bool = True,
            key_type: trustme.KeyType = trustme.KeyType.ECDSA):
    """`tls install` of a new certificate from ``ca``; returns the CLI's result and the
    certificate (DER) a client should now be served."""
    cert = ca.issue_cert(name, key_type=key_type)
    folder = gw.home.parent
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        with open(cert_path, "ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_path))
    args = ["tls", "install", "--cert", str(cert_path), "--key", str(key_path)]
    if listener:
        args += ["--listener", listener]
    return gw.cli(*args, check=check), ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def client_context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def tls_gw(gateway, sink, ca):
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.smtps_port = free_port()
    install(gateway, ca)
    gateway.start("--smtps", f"127.0.0.1:{gateway.smtps_port}")
    return gateway


def test_starttls_verifies_against_the_installed_certificate(tls_gw, ca, sink):
    with smtplib.SMTP("127.0.0.1", tls_gw.port, local_hostname="client.test", timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        ctx = client_context(ca)
        ctx.check_hostname = True
        s._host = "gw.test"           # what the client checks the certificate against
        s.starttls(context=ctx)
        s.ehlo()
        assert not s.has_extn("starttls")            # not offered twice
        s.sendmail("a@sender.test", ["b@example.test"], make_message(subject="over tls"))
    got = sink.wait_for(1)[0]
    assert b"with ESMTPS id" in got.data


def test_smtps_is_tls_from_the_first_byte(tls_gw, ca, sink):
    ctx = client_context(ca)
    add_user(tls_gw, "a@example.test")
    with smtplib.SMTP_SSL("127.0.0.1", tls_gw.smtps_port, local_hostname="client.test", timeout=10,
                          context=_no_hostname(ctx)) as s:
        code, _ = s.ehlo()
        assert code == 250 and not s.has_extn("starttls")
        assert s.has_extn("auth")                   # offered at once: the channel is TLS already
        s.login("a@example.test", PASSWORD)
        s.sendmail("a@example.test", ["b@example.test"], make_message(subject="smtps", sender="a@example.test"))
    assert b"Subject: smtps" in sink.wait_for(1)[0].data


def _no_hostname(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.check_hostname = False         # we connect by IP; the chain is still verified
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused(tls_gw, version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            # Python warns that these versions are deprecated: that is the point.
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = version
            ctx.maximum_version = version
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.fail("this OpenSSL cannot even offer the old version to test against")
    with socket.create_connection(("127.0.0.1", tls_gw.smtps_port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            with ctx.wrap_socket(raw) as t:
                t.recv(100)


def test_plaintext_pipelined_after_starttls_is_not_executed(tls_gw, ca):
    with socket.create_connection(("127.0.0.1", tls_gw.port), timeout=10) as raw:
        raw.recv(1000)
        raw.sendall(b"EHLO c.test\r\n")
        time.sleep(0.2)
        raw.recv(1000)
        # The injection: a command behind STARTTLS in the same packet.
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert raw.recv(1000).startswith(b"220")
        with _no_hostname(client_context(ca)).wrap_socket(raw) as t:
            t.sendall(b"EHLO c.test\r\n")
            time.sleep(0.2)
            t.recv(2000)
            # Had the injected MAIL run, this would be "503 nested MAIL".
            t.sendall(b"MAIL FROM:<good@sender.test>\r\n")
            assert t.recv(1000).startswith(b"250 2.1.0")


def test_new_certificate_is_used_by_the_next_connection(tls_gw, ca):
    def served_name() -> str:
        with socket.create_connection(("127.0.0.1", tls_gw.smtps_port), timeout=10) as raw:
            with _no_hostname(client_context(ca)).wrap_socket(raw) as t:
                cert = t.getpeercert()
                return dict(x[0] for x in cert["subject"]).get("commonName") or \
                    cert["subjectAltName"][0][1]

    assert served_name() == "gw.test"
    install(tls_gw, ca, name="renewed.test")
    tls_gw.wait_until(lambda: served_name() == "renewed.test", timeout=5, what="reload")
    assert tls_gw.proc.poll() is None


def served_certificate(port: int, starttls: bool) -> bytes:
    """The certificate (DER) a client that offers both ECDSA and RSA, as every modern
    one does, is served."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE        # the self-signed one must be readable too
    if starttls:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo()
            s.starttls(context=ctx)
            return s.sock.getpeercert(binary_form=True)
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=ctx) as s:
        return s.sock.getpeercert(binary_form=True)


@pytest.mark.parametrize("starttls", [True, False], ids=["starttls", "smtps"])
def test_rsa_and_ecdsa_certificates_replace_each_other_on_a_running_engine(gateway, ca, starttls):
    # Started on the self-signed ECDSA certificate, as a new install is; an RSA one
    # loaded beside it used to leave the old ECDSA one served to ECDSA-capable clients.
    gateway.smtps_port = free_port()
    gateway.start("--smtps", f"127.0.0.1:{gateway.smtps_port}")
    port = gateway.port if starttls else gateway.smtps_port
    served = [served_certificate(port, starttls)]
    for key_type, name in ((trustme.KeyType.RSA, "rsa.test"), (trustme.KeyType.ECDSA, "ec.test"),
                           (trustme.KeyType.RSA, "rsa-again.test")):
        _, want = install(gateway, ca, name, key_type=key_type)
        gateway.wait_until(lambda: served_certificate(port, starttls) == want, timeout=5,
                           what=f"{name} served")
        served.append(want)
    assert len(set(served)) == 4 and gateway.proc.poll() is None


def test_a_session_opened_before_the_install_gets_the_new_certificate_at_starttls(gateway, ca):
    gateway.start()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.ehlo()                            # connected while the self-signed one was current
        _, want = install(gateway, ca, "later.test", key_type=trustme.KeyType.RSA)
        gateway.wait_until(lambda: served_certificate(gateway.port, True) == want, timeout=5, what="reload")
        s.starttls(context=ctx)
        assert s.sock.getpeercert(binary_form=True) == want


def test_a_certificate_for_a_listener_that_does_not_exist_is_refused(gateway, ca):
    out, _ = install(gateway, ca, listener="submision", check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "no listener named submision" in out.stderr
    assert not list((gateway.home / "tls").glob("submision*"))
    # Listeners that do exist: the defaults, those `serve --smtps` makes, those in the store.
    gateway.cli("listeners", "add", "mx", "inbound", "127.0.0.1:2526")
    for listener in ("submission", "smtps", "mx"):
        install(gateway, ca, listener=listener)
        assert (gateway.home / "tls" / f"{listener}.crt").exists()


def test_tls_facts_are_in_the_verdict_trace(tls_gw, ca, sink):
    ctx = _no_hostname(client_context(ca))
    add_user(tls_gw, "a@example.test")
    with smtplib.SMTP_SSL("127.0.0.1", tls_gw.smtps_port, timeout=10, context=ctx) as s:
        s.login("a@example.test", PASSWORD)
        s.sendmail("a@example.test", ["b@example.test"],
                   make_message(message_id="<tls-trace@client.test>", sender="a@example.test"))
    tls_gw.wait_until(lambda: tls_gw.query("SELECT detail FROM verdicts WHERE symbol = 'TLS_ESTABLISHED'"),
                      what="tls verdict")
    detail = tls_gw.query("SELECT detail FROM verdicts WHERE symbol = 'TLS_ESTABLISHED'")[0]["detail"]
    assert detail.startswith("TLSv1.3") or detail.startswith("TLSv1.2")
    out = tls_gw.cli("messages", "why", "<tls-trace@client.test>")
    assert "TLS_ESTABLISHED" in out.stdout


def test_first_start_makes_a_self_signed_certificate(gateway):
    gateway.start()
    assert "generated a self-signed one" in gateway.log()
    shown = gateway.cli("tls", "show", "--json").stdout
    assert '"self_signed": true' in shown
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.ehlo()
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s.starttls(context=ctx)
        assert s.ehlo()[0] == 250
