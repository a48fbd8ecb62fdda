"""Authentication with real clients (smtplib, swaks): PLAIN and LOGIN over STARTTLS
and over implicit TLS, the same failure for a wrong password, an unknown user and a
disabled user, submission requires AUTH, anti-impersonation of envelope and headers,
brute-force disconnect and ban, password policy."""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
import time

import pytest

from mailbox_guard import replies
from tests.conftest import free_port, make_message

PASSWORD = "Corr3ct-Horse-Battery"


def add_user(gw, name: str, password: str = PASSWORD):
    return gw.cli("users", "add", name, "--password-stdin", input=password + "\n", check=False)


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def sub(gateway, sink):
    """A submission and an SMTPS listener; alice and bob; example.test to the sink."""
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.policy().add_domain("other.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    assert add_user(gateway, "bob@example.test").returncode == 0
    gateway.cli("users", "alias", "alice@example.test", "sales@example.test")
    gateway.sub_port, gateway.smtps_port = free_port(), free_port()
    gateway.start("--submission", f"127.0.0.1:{gateway.sub_port}", "--smtps", f"127.0.0.1:{gateway.smtps_port}")
    return gateway


def submission(gw, source: str | None = None, timeout: float = 10) -> smtplib.SMTP:
    """A submission session over STARTTLS, from ``source`` (a loopback address) if given."""
    s = smtplib.SMTP("127.0.0.1", gw.sub_port, local_hostname="client.test", timeout=timeout,
                     source_address=(source, 0) if source else None)
    s.ehlo()
    s.starttls(context=insecure())
    s.ehlo()
    return s


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_auth_over_starttls_then_send(sub, sink, mechanism):
    with submission(sub) as s:
        assert s.esmtp_features["auth"].split() == ["LOGIN", "PLAIN", "SCRAM-SHA-256"]
        s.user, s.password = "alice@example.test", PASSWORD
        code, _ = s.auth(mechanism, getattr(s, f"auth_{mechanism.lower()}"))
        assert code == 235
        s.sendmail("alice@example.test", ["friend@elsewhere.test"],
                   make_message(sender="alice@example.test", to="friend@elsewhere.test", subject=mechanism))
    # Relaying to any domain is allowed once authenticated (delivery by MX is not
    # possible here: the message waits in the queue).
    sub.wait_until(lambda: sub.query("SELECT count(*) AS n FROM messages")[0]["n"] == 1, what="queued")
    trace = sub.query("SELECT symbol FROM verdicts WHERE symbol IN ('AUTH_OK', 'RELAY_AUTHENTICATED')")
    assert {r["symbol"] for r in trace} >= {"RELAY_AUTHENTICATED"}


def test_smtps_login(sub, sink):
    with smtplib.SMTP_SSL("127.0.0.1", sub.smtps_port, timeout=10, context=insecure()) as s:
        s.login("alice@example.test", PASSWORD)
        s.sendmail("alice@example.test", ["bob@example.test"], make_message(sender="alice@example.test"))
    assert sink.wait_for(1)[0].mail_from == "alice@example.test"


@pytest.mark.parametrize("mechanism,tls", [("PLAIN", "--tls"), ("LOGIN", "--tls"),
                                           ("PLAIN", "--tls-on-connect"), ("LOGIN", "--tls-on-connect")])
def test_swaks_auth(sub, sink, mechanism, tls):
    swaks = shutil.which("swaks")
    assert swaks, "swaks is required"
    port = sub.sub_port if tls == "--tls" else sub.smtps_port
    out = subprocess.run([swaks, "--server", f"127.0.0.1:{port}", tls, "--auth", mechanism,
                          "--auth-user", "alice@example.test", "--auth-password", PASSWORD,
                          "--from", "alice@example.test", "--to", "bob@example.test",
                          "--header", "From: alice@example.test", "--helo", "swaks.test"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "235 2.7.0" in out.stdout and "queued as" in out.stdout
    assert PASSWORD not in sub.log()          # no secret in a log line


def test_failures_look_the_same_and_say_nothing(sub):
    sub.cli("users", "disable", "bob@example.test")
    answers = []
    for user, password in (("alice@example.test", "wrong-Password-1"), ("nobody@example.test", PASSWORD),
                           ("bob@example.test", PASSWORD)):
        with submission(sub) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                s.login(user, password)
            answers.append((err.value.smtp_code, err.value.smtp_error))
    assert len(set(answers)) == 1
    assert answers[0] == (535, replies.S535_AUTH_FAILED[4:].encode())


def test_submission_requires_auth_and_tls(sub):
    with smtplib.SMTP("127.0.0.1", sub.sub_port, timeout=10) as s:
        s.ehlo()
        assert "auth" not in s.esmtp_features                  # not before TLS
        assert s.docmd("AUTH", "PLAIN AGFsaWNlAHg=")[0] == 538
        assert s.docmd("MAIL", "FROM:<alice@example.test>")[0] == 530
    with submission(sub) as s:
        assert s.docmd("MAIL", "FROM:<alice@example.test>")[0] == 530


def test_inbound_listener_offers_no_auth(sub):
    with smtplib.SMTP("127.0.0.1", sub.port, timeout=10) as s:
        s.ehlo()
        s.starttls(context=insecure())
        s.ehlo()
        assert "auth" not in s.esmtp_features
        assert s.docmd("AUTH", "PLAIN AGFsaWNlAHg=")[0] == 504


def login(sub, user="alice@example.test") -> smtplib.SMTP:
    s = submission(sub)
    s.login(user, PASSWORD)
    return s


def test_envelope_impersonation(sub, sink):
    with login(sub) as s:
        assert s.docmd("MAIL", "FROM:<sales@example.test>")[0] == 250          # an alias
        s.rset()
        code, text = s.docmd("MAIL", "FROM:<bob@example.test>")                # someone else
        assert (code, text.decode()) == (553, replies.S553_SENDER_NOT_OWNED[4:].format(user="alice@example.test"))
        assert s.docmd("MAIL", "FROM:<ALICE@Example.Test>")[0] == 250          # case does not matter


def test_header_impersonation(sub, sink):
    with login(sub) as s:
        s.mail("alice@example.test")
        s.rcpt("bob@example.test")
        code, text = s.data(make_message(sender="bob@example.test"))
        assert code == 553 and b"From:/Sender:" in text
        s.mail("alice@example.test")
        s.rcpt("bob@example.test")
        sender_hdr = make_message(sender="alice@example.test").replace(b"Subject:", b"Sender: <boss@example.test>\r\nSubject:")
        assert s.data(sender_hdr)[0] == 553
        s.mail("alice@example.test")
        s.rcpt("bob@example.test")
        assert s.data(make_message(sender="sales@example.test"))[0] == 250      # alias in From:
    assert sink.wait_for(1)
    assert sub.query("SELECT count(*) AS n FROM verdicts WHERE symbol = 'HEADER_SENDER_NOT_OWNED'")[0]["n"] == 2


def test_anti_impersonation_can_be_switched_off_per_domain(sub):
    sub.cli("domains", "set", "example.test", "--anti-impersonation", "off")
    sub.wait_until(lambda: _mail_code(sub, "bob@example.test") == 250, timeout=5, what="policy reload")


def _mail_code(sub, sender: str) -> int:
    with login(sub) as s:
        return s.docmd("MAIL", f"FROM:<{sender}>")[0]


def test_brute_force_disconnect_ban_and_expiry(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    gateway.configure(**{"auth.session_failures": "3", "auth.ban_after": "5", "auth.ban_time": "3s"})
    gateway.sub_port = free_port()
    gateway.start("--submission", f"127.0.0.1:{gateway.sub_port}")
    # Three failures in one session: disconnected.
    with submission(gateway) as s:
        for i in range(2):
            assert s.docmd("AUTH", _plain("alice@example.test", f"bad-{i}"))[0] == 535
        code, _ = s.docmd("AUTH", _plain("alice@example.test", "bad-2"))
        assert code == 535
        assert s.getreply()[0] == 421
    # Two more from the same address: banned; the right password is refused too.
    with submission(gateway) as s:
        for i in range(2):
            s.docmd("AUTH", _plain("alice@example.test", f"worse-{i}"))
    with submission(gateway) as s:
        assert s.docmd("AUTH", _plain("alice@example.test", PASSWORD))[0] == 535
    bans = gateway.cli("auth", "bans", "--json").stdout
    assert '"127.0.0.1"' in bans
    time.sleep(3.2)
    with submission(gateway) as s:
        assert s.docmd("AUTH", _plain("alice@example.test", PASSWORD))[0] == 235


def test_unban_from_the_cli(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    gateway.configure(**{"auth.ban_after": "2", "auth.ban_time": "1h"})
    gateway.sub_port = free_port()
    gateway.start("--submission", f"127.0.0.1:{gateway.sub_port}")
    for i in range(2):
        with submission(gateway) as s:
            s.docmd("AUTH", _plain("alice@example.test", f"bad-{i}"))
    with submission(gateway) as s:
        assert s.docmd("AUTH", _plain("alice@example.test", PASSWORD))[0] == 535
    gateway.cli("auth", "unban", "127.0.0.1")
    gateway.wait_until(lambda: _auth_code(gateway) == 235, timeout=5, what="unban picked up")


def _auth_code(gw) -> int:
    with submission(gw) as s:
        return s.docmd("AUTH", _plain("alice@example.test", PASSWORD))[0]


def _plain(user: str, password: str) -> str:
    import base64
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.mark.parametrize("password,rule", [("Short1!", "too short"), ("alllowercaseletters", "needs 3"),
                                           ("Password123!", "common"), ("Alice-Example-2026", "user name")])
def test_password_policy_names_the_rule(gateway, password, rule):
    gateway.policy().add_domain("example.test")
    out = gateway.cli("users", "add", "alice@example.test", "--password-stdin", input=password + "\n", check=False)
    assert out.returncode == 1 and rule in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_domain_password_policy_overrides_the_server(gateway):
    gateway.policy().add_domain("strict.test")
    gateway.cli("users", "policy", "--domain", "strict.test", "--min-length", "30")
    out = gateway.cli("users", "add", "a@strict.test", "--password-stdin", input=PASSWORD + "\n", check=False)
    assert out.returncode == 1 and "at least 30" in out.stderr


def test_passwords_are_stored_as_argon2id(gateway):
    gateway.policy().add_domain("example.test")
    add_user(gateway, "alice@example.test")
    row = gateway.query("SELECT password_hash FROM users")[0]["password_hash"]
    assert row.startswith("$argon2id$v=19$m=19456,t=2,p=1$") and PASSWORD not in row


def scram_login(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """A SCRAM-SHA-256 client exchange (scramp's client) over SMTP AUTH."""
    import base64
    from scramp import ScramClient
    client = ScramClient(["SCRAM-SHA-256"], user, password)
    code, resp = s.docmd("AUTH", "SCRAM-SHA-256 " + base64.b64encode(client.get_client_first().encode()).decode())
    if code != 334:
        return code, resp
    client.set_server_first(base64.b64decode(resp).decode())
    code, resp = s.docmd(base64.b64encode(client.get_client_final().encode()).decode())
    if code != 334:
        return code, resp
    client.set_server_final(base64.b64decode(resp).decode())     # checks the server's proof
    return s.docmd("")


def test_scram_sha_256(sub, sink):
    with submission(sub) as s:
        assert scram_login(s, "alice@example.test", PASSWORD)[0] == 235
        s.sendmail("alice@example.test", ["bob@example.test"], make_message(sender="alice@example.test"))
    assert sink.wait_for(1)
    answers = set()
    for user, password in (("alice@example.test", "wrong-Password-1"), ("nobody@example.test", PASSWORD)):
        with submission(sub) as s:
            answers.add(scram_login(s, user, password))
    assert answers == {(535, replies.S535_AUTH_FAILED[4:].encode())}
    secrets = sub.query("SELECT mechanism, secret FROM user_secrets WHERE user = 'alice@example.test'")
    assert [r["mechanism"] for r in secrets] == ["SCRAM-SHA-256"] and PASSWORD not in secrets[0]["secret"]


@pytest.mark.parametrize("mechanism", ["DIGEST-MD5", "CRAM-MD5"])
def test_legacy_mechanism_is_off_until_a_domain_enables_it(sub, sink, mechanism):
    with submission(sub) as s:
        assert mechanism not in s.esmtp_features["auth"]
        assert s.docmd("AUTH", mechanism)[0] == 504
    sub.cli("users", "mechanism", "example.test", mechanism, "on")
    sub.cli("users", "passwd", "alice@example.test", "--password-stdin", input=PASSWORD + "\n")
    secret = sub.query("SELECT secret FROM user_secrets WHERE mechanism = ?", mechanism)
    assert len(secret) == 1 and PASSWORD not in secret[0]["secret"]
    swaks = shutil.which("swaks")
    sub.wait_until(lambda: mechanism in _features(sub), timeout=5, what="mechanism on")
    assert _features(sub).split()[0] == ("CRAM-MD5" if mechanism == "CRAM-MD5" else "LOGIN")
    for tls, port in (("--tls", sub.sub_port), ("--tls-on-connect", sub.smtps_port)):
        out = subprocess.run([swaks, "--server", f"127.0.0.1:{port}", tls, "--auth", mechanism,
                              "--auth-user", "alice@example.test", "--auth-password", PASSWORD,
                              "--from", "alice@example.test", "--to", "bob@example.test",
                              "--header", "From: alice@example.test"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "235 2.7.0" in out.stdout, out.stdout[-1500:]
    out = subprocess.run([swaks, "--server", f"127.0.0.1:{sub.sub_port}", "--tls", "--auth", mechanism,
                          "--auth-user", "alice@example.test", "--auth-password", "wrong-Password-1",
                          "--from", "alice@example.test", "--to", "bob@example.test"],
                         capture_output=True, text=True, timeout=60)
    assert "535 5.7.8" in out.stdout
    # Switched off again: the derived secrets are gone.
    sub.cli("users", "mechanism", "example.test", mechanism, "off")
    assert sub.query("SELECT count(*) AS n FROM user_secrets WHERE mechanism = ?", mechanism)[0]["n"] == 0


def _features(gw) -> str:
    with submission(gw) as s:
        return s.esmtp_features.get("auth", "")


def test_listener_that_accepts_only_authenticated_clients(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    gateway.cli("listeners", "add", "mx", "inbound", f"127.0.0.1:{gateway.port}", "--require-auth")
    gateway.start(listeners_from_store=True)
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.ehlo()
        assert s.docmd("MAIL", "FROM:<x@sender.test>")[0] == 530
        s.starttls(context=insecure())
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"]
        s.login("alice@example.test", PASSWORD)
        assert s.docmd("MAIL", "FROM:<alice@example.test>")[0] == 250


def test_plaintext_auth_only_on_a_loopback_listener_that_allows_it(gateway, sink):
    out = gateway.cli("listeners", "add", "lan", "submission", "192.0.2.10:2587", "--plaintext-auth", check=False)
    assert out.returncode == 1 and "loopback" in out.stderr
    gateway.policy().add_domain("example.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    gateway.cli("listeners", "add", "local", "submission", f"127.0.0.1:{gateway.port}", "--plaintext-auth")
    gateway.start(listeners_from_store=True)
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"]            # before any TLS
        s.login("alice@example.test", PASSWORD)
        s.sendmail("alice@example.test", ["bob@example.test"], make_message(sender="alice@example.test"))
    assert sink.wait_for(1)


def test_cram_md5_secret_matches_hmac():
    """The derived secret answers exactly what HMAC-MD5 with the password would."""
    import hashlib
    import hmac
    import os
    from mailbox_guard.auth import cram_md5
    for n in range(50):
        password = os.urandom(n + 1).hex()[: n * 3 + 1]
        challenge = os.urandom(n * 4)
        assert cram_md5.expected(cram_md5.derive(password), challenge) == \
            hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()


def test_old_hash_parameters_are_upgraded_at_login(sub):
    from argon2 import PasswordHasher
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    conn = sub.db()
    conn.execute("UPDATE users SET password_hash = ? WHERE name = 'alice@example.test'", (weak,))
    conn.commit()
    conn.close()
    with login(sub):
        pass
    sub.wait_until(lambda: sub.query("SELECT password_hash FROM users WHERE name = 'alice@example.test'")[0]
                   ["password_hash"].startswith("$argon2id$v=19$m=19456,t=2,p=1$"), what="rehash")
    assert "password hash of alice@example.test upgraded" in sub.log()


@pytest.mark.parametrize("forged", [
    b"From : ceo@victim.test\r\n",                      # obsolete syntax, honoured by readers
    b"From\t: ceo@victim.test\r\n",
    b"FROM: ceo@victim.test\r\n",
    b"From: alice@example.test\r\nFrom: ceo@victim.test\r\n",     # a second From
    b"From: alice@example.test,\r\n ceo@victim.test\r\n",        # folded list
    b"From: undisclosed:;\r\n",                         # group syntax, no address
])
def test_header_tricks_do_not_hide_a_foreign_sender(sub, forged):
    msg = b"Sender: alice@example.test\r\n" + forged + b"Subject: x\r\nMessage-ID: <t@c.test>\r\n\r\nbody\r\n"
    with login(sub) as s:
        s.mail("alice@example.test")
        s.rcpt("bob@example.test")
        assert s.data(msg)[0] == 553


def test_oversized_header_section_cannot_hide_a_foreign_sender(sub):
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 900) for i in range(300))
    msg = b"Sender: alice@example.test\r\n" + padding + b"From: ceo@victim.test\r\n\r\nbody\r\n"
    with login(sub) as s:
        s.mail("alice@example.test")
        s.rcpt("bob@example.test")
        assert s.data(msg)[0] == 553


def test_every_spelling_of_the_login_counts_towards_its_penalty(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    gateway.configure(**{"auth.penalty_after": "3", "auth.penalty_max": "2s", "auth.ban_after": "0",
                         "auth.net_ban_after": "0", "auth.session_failures": "10"})
    gateway.sub_port = free_port()
    gateway.start("--submission", f"127.0.0.1:{gateway.sub_port}")
    with submission(gateway) as s:
        for spelling in ("alice@example.test", "ALICE@Example.Test", " alice@example.test"):
            assert s.docmd("AUTH", _plain(spelling, "wrong"))[0] == 535
    # The owner never logged in from here: the try waits, whatever the spelling; the
    # right password still works (no account is locked), and from then on this
    # network is the owner's: no more waiting.
    for spelling, waits in (("Alice@example.test", True), ("alice@EXAMPLE.test", False)):
        with submission(gateway) as s:
            started = time.monotonic()
            assert s.docmd("AUTH", _plain(spelling, PASSWORD))[0] == 235, repr(spelling)
            assert (time.monotonic() - started >= 0.9) is waits, repr(spelling)


def test_a_successful_login_does_not_reset_the_address_count(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    assert add_user(gateway, "mallory@example.test").returncode == 0
    gateway.configure(**{"auth.ban_after": "4", "auth.session_failures": "10"})
    gateway.sub_port = free_port()
    gateway.start("--submission", f"127.0.0.1:{gateway.sub_port}")
    for round_ in range(2):
        with submission(gateway) as s:
            for i in range(2):
                s.docmd("AUTH", _plain("alice@example.test", f"guess-{round_}-{i}"))
        with submission(gateway) as s:
            s.docmd("AUTH", _plain("mallory@example.test", PASSWORD))
    with submission(gateway) as s:
        assert s.docmd("AUTH", _plain("alice@example.test", PASSWORD))[0] == 535     # banned by now


def test_scram_answers_the_same_for_unknown_users(sub):
    import base64
    from scramp import ScramClient

    def server_first(user: str) -> dict:
        with submission(sub) as s:
            client = ScramClient(["SCRAM-SHA-256"], user, "x")
            code, resp = s.docmd("AUTH", "SCRAM-SHA-256 " + base64.b64encode(client.get_client_first().encode()).decode())
            assert code == 334
            first = base64.b64decode(resp).decode()
            s.docmd("*")
            return dict(p.split("=", 1) for p in first.split(","))

    def salt_of(user: str) -> str:
        return server_first(user)["s"]
    sub.cli("users", "disable", "bob@example.test")
    # Nothing in the server-first message tells a real account from an unknown or a
    # disabled one: the same salt length, the same iterations, the same nonce shape.
    shapes = {}
    for user in ("alice@example.test", "ghost@example.test", "bob@example.test"):
        first = server_first(user)
        shapes[user] = (len(base64.b64decode(first["s"])), first["i"], len(first["r"]), tuple(sorted(first)))
    assert len(set(shapes.values())) == 1, shapes
    assert shapes["alice@example.test"][:2] == (32, "4096")
    # A real account's salt is stable; so is an unknown login's, across restarts too.
    assert salt_of("alice@example.test") == salt_of("alice@example.test")
    ghost = salt_of("ghost@example.test")
    assert ghost == salt_of("ghost@example.test")
    sub.stop()
    sub.start("--submission", f"127.0.0.1:{sub.sub_port}", "--smtps", f"127.0.0.1:{sub.smtps_port}")
    assert salt_of("ghost@example.test") == ghost


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "DIGEST-MD5"])
def test_garbage_answers_to_legacy_mechanisms_fail_cleanly(sub, mechanism):
    import base64
    sub.cli("users", "mechanism", "example.test", mechanism, "on")
    sub.cli("users", "passwd", "alice@example.test", "--password-stdin", input=PASSWORD + "\n")
    sub.wait_until(lambda: mechanism in _features(sub), timeout=5, what="mechanism on")
    answer = ("alice@example.test \xff\xff" if mechanism == "CRAM-MD5" else
              'username="alice@example.test",realm="example.test",nonce="x",cnonce="y",nc=00000001,'
              'qop=auth,digest-uri="smtp/gw.test",response="\u00e9"')
    with submission(sub) as s:
        assert s.docmd("AUTH", mechanism)[0] == 334
        code, _ = s.docmd(base64.b64encode(answer.encode()).decode())
        assert code == 535
    assert "Traceback" not in sub.log()


def test_an_overlong_auth_line_is_refused_cleanly(sub):
    with submission(sub) as s:
        assert s.docmd("AUTH", "LOGIN")[0] == 334
        s.send(b"A" * 20000 + b"\r\n")
        assert s.getreply()[0] == 500
        assert s.noop()[0] == 250
    assert "Traceback" not in sub.log()


def test_failed_tls_handshakes_leave_no_traceback(sub):
    import socket
    with socket.create_connection(("127.0.0.1", sub.sub_port), timeout=10) as raw:
        raw.recv(1000)
        raw.sendall(b"EHLO x\r\n")
        time.sleep(0.2)
        raw.recv(1000)
        raw.sendall(b"STARTTLS\r\n")
        raw.recv(1000)
        raw.sendall(b"this is not a TLS client hello\r\n" * 10)
        time.sleep(0.5)
    with socket.create_connection(("127.0.0.1", sub.smtps_port), timeout=10) as raw:
        raw.sendall(b"EHLO plain text on an SMTPS port\r\n")
        time.sleep(0.5)
    time.sleep(0.5)
    assert "Traceback" not in sub.log()
    assert sub.proc.poll() is None


def test_every_mechanism_logs_a_failure_with_the_client_address(sub):
    """Postfix's `unknown[IP]: SASL MECH authentication failed: user=<...>` line for each
    mechanism, each from its own loopback address, so that fail2ban's filters ban the
    client whatever mechanism it tries."""
    for mechanism in ("CRAM-MD5", "DIGEST-MD5"):
        sub.cli("users", "mechanism", "example.test", mechanism, "on")
    sub.cli("users", "passwd", "alice@example.test", "--password-stdin", input=PASSWORD + "\n")
    sub.wait_until(lambda: {"CRAM-MD5", "DIGEST-MD5"} <= set(_features(sub).split()), timeout=5,
                   what="legacy mechanisms on")
    wrong = "wrong-Password-1"

    def smtplib_auth(source, mechanism):
        with submission(sub, source) as s:
            s.user, s.password = "alice@example.test", wrong
            with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                s.auth(mechanism, getattr(s, f"auth_{mechanism.lower().replace('-', '_')}"))
            assert err.value.smtp_code == 535

    def scram(source, _):
        with submission(sub, source) as s:
            assert scram_login(s, "alice@example.test", wrong)[0] == 535

    def swaks(source, mechanism):
        out = subprocess.run([shutil.which("swaks"), "--server", f"127.0.0.1:{sub.sub_port}", "--tls",
                              "--local-interface", source, "--auth", mechanism, "--auth-user", "alice@example.test",
                              "--auth-password", wrong, "--from", "alice@example.test", "--to", "bob@example.test"],
                             capture_output=True, text=True, timeout=60)
        assert "535 5.7.8" in out.stdout, out.stdout[-1500:]

    clients = {"PLAIN": smtplib_auth, "LOGIN": smtplib_auth, "CRAM-MD5": smtplib_auth, "DIGEST-MD5": swaks,
               "SCRAM-SHA-256": scram}
    for n, (mechanism, client) in enumerate(clients.items(), 11):
        client(f"127.0.0.{n}", mechanism)
    sub.wait_until(lambda: sub.log().count("authentication failed") >= len(clients), timeout=5,
                   what="a failure line per mechanism")
    log = sub.log()
    for n, mechanism in enumerate(clients, 11):
        line = f"unknown[127.0.0.{n}]: SASL {mechanism} authentication failed: user=<alice@example.test> conn=C"
        assert line in log, (mechanism, [x for x in log.splitlines() if "authentication failed" in x])
    assert wrong not in log
