"""TLS for every listener: server contexts (TLS 1.2 minimum, forward-secret AEAD
ciphers only), certificates kept in ``HOME/tls/``, a self-signed certificate made on
first start when none is installed, and reload without restart (a new context is
built when a listener's files change; the next handshake uses it).

Certificates: ``HOME/tls/<listener>.crt`` + ``.key`` for one listener, else
``HOME/tls/default.crt`` + ``.key`` for all of them.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mailbox_guard.tls")

TLS_DIR = "tls"
DEFAULT = "default"
# TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 suites are all fine as is.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


class TlsError(Exception):
    """A certificate or key that cannot be used; one line an admin can act on."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_NONE        # mail clients rarely have certificates
    load_chain(ctx, cert, key)
    return ctx


def load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot use certificate {cert} with key {key}: {getattr(exc, 'strerror', None) or exc}") from None


def generate_self_signed(cert: Path, key: Path, hostname: str) -> None:
    """A throwaway certificate so every listener can offer TLS from the first start."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
                   .sign(private, hashes.SHA256()))
    cert.parent.mkdir(mode=0o750, exist_ok=True)
    _write_private(key, private.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class CertInfo:
    name: str
    path: str
    subject: str
    issuer: str
    not_after: str
    self_signed: bool
    sha256: str


def describe(name: str, cert: Path) -> CertInfo:
    from cryptography import x509
    data = cert.read_bytes()
    c = x509.load_pem_x509_certificate(data)
    return CertInfo(name=name, path=str(cert), subject=c.subject.rfc4514_string(),
                    issuer=c.issuer.rfc4514_string(),
                    not_after=c.not_valid_after_utc.isoformat(), self_signed=c.subject == c.issuer,
                    sha256=hashlib.sha256(c.public_bytes(_der())).hexdigest())


def _der():
    from cryptography.hazmat.primitives import serialization
    return serialization.Encoding.DER


def install(home: Path, cert_file: Path, key_file: Path, listener: str | None = None) -> CertInfo:
    """Validate a certificate and key (they must load together), then copy them in."""
    try:
        cert_data, key_data = cert_file.read_bytes(), key_file.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {exc.filename}: {exc.strerror}") from None
    name = listener or DEFAULT
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
        raise TlsError(f"bad listener name {name!r} (letters, digits, - and _)")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_chain(probe, cert_file, key_file)
    folder = home / TLS_DIR
    folder.mkdir(mode=0o750, exist_ok=True)
    # Key first, certificate last: the engine reloads when the certificate changes.
    tmp_key, tmp_cert = folder / f".{name}.key.new", folder / f".{name}.crt.new"
    _write_private(tmp_key, key_data)
    tmp_cert.write_bytes(cert_data)
    tmp_key.replace(folder / f"{name}.key")
    tmp_cert.replace(folder / f"{name}.crt")
    return describe(name, folder / f"{name}.crt")


class TlsManager:
    """One context per listener, cached (``context`` runs per connection) and replaced
    by a fresh one when its files change."""

    def __init__(self, home: Path, hostname: str) -> None:
        self.folder = home / TLS_DIR
        self.hostname = hostname
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._stamps: dict[str, tuple] = {}
        self.generated = False

    def files(self, listener: str) -> tuple[Path, Path]:
        own = self.folder / f"{listener}.crt", self.folder / f"{listener}.key"
        if own[0].exists() and own[1].exists():
            return own
        return self.folder / f"{DEFAULT}.crt", self.folder / f"{DEFAULT}.key"

    def ensure_default(self) -> None:
        cert, key = self.folder / f"{DEFAULT}.crt", self.folder / f"{DEFAULT}.key"
        if not (cert.exists() and key.exists()):
            generate_self_signed(cert, key, self.hostname)
            self.generated = True
            log.warning("no TLS certificate installed: generated a self-signed one for %s in %s "
                        "(install a real one with `mailbox-guard tls install --cert F --key F`)",
                        self.hostname, cert)

    def context(self, listener: str) -> ssl.SSLContext:
        """The current context of a listener (a dict look-up once built)."""
        ctx = self._contexts.get(listener)
        if ctx is None:
            cert, key = self.files(listener)
            stamp = self._stamp(cert, key)
            ctx = self._contexts[listener] = self._build(listener, cert, key)
            self._stamps[listener] = stamp
        return ctx

    def _build(self, listener: str, cert: Path, key: Path) -> ssl.SSLContext:
        # Always a new context: load_cert_chain into a used one fills the slot of the
        # new key's type only, so an RSA certificate would sit beside the old ECDSA one
        # and every client that offers ECDSA would still get the old certificate.
        ctx = server_context(cert, key)
        # A context handed out earlier (a session takes one at connect and may send
        # STARTTLS minutes later) switches its handshake to the current one.
        ctx.sni_callback = lambda conn, _name, _ctx: self._switch(listener, conn)
        return ctx

    def _switch(self, listener: str, conn: ssl.SSLObject) -> None:
        current = self._contexts.get(listener)
        if current is not None and conn.context is not current:
            conn.context = current

    @staticmethod
    def _stamp(cert: Path, key: Path) -> tuple:
        # The inode too: `install` renames new files in, and an mtime alone may repeat.
        try:
            c, k = cert.stat(), key.stat()
            return (str(cert), c.st_ino, c.st_mtime_ns, k.st_ino, k.st_mtime_ns)
        except OSError:
            return (str(cert), None)

    def refresh(self) -> list[str]:
        """Rebuild contexts whose files changed; a broken new pair keeps the old one."""
        changed = []
        for listener in list(self._contexts):
            cert, key = self.files(listener)
            stamp = self._stamp(cert, key)
            if stamp == self._stamps.get(listener):
                continue
            try:
                self._contexts[listener] = self._build(listener, cert, key)
            except TlsError as exc:
                log.error("TLS reload for %s failed, keeping the previous certificate: %s", listener, exc)
            else:
                log.info("TLS certificate for %s reloaded from %s", listener, cert)
                changed.append(listener)
            self._stamps[listener] = stamp
        return changed
