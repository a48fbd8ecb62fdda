"""GSSAPI (Kerberos) for SMTP AUTH, RFC 4752, with the ``gssapi`` package.

The admin installs a keytab and names the service principal
(``mailbox-guard auth gssapi --keytab F --principal smtp/mail.example.org``). When the
package is missing or no keytab is installed, GSSAPI is not offered and
:func:`availability` says why (``status`` shows it). A Kerberos principal
``alice@EXAMPLE.ORG`` logs in as the user ``alice@example.org``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

KEYTAB = "gssapi.keytab"


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str
    principal: str | None = None


def availability(home: Path, principal: str) -> Availability:
    try:
        import gssapi  # noqa: F401
    except ImportError:
        return Availability(False, "the gssapi package is not installed (pip install gssapi; "
                                   "the single-file build does not include it)")
    keytab = home / KEYTAB
    if not keytab.exists():
        return Availability(False, "no keytab installed (mailbox-guard auth gssapi --keytab F "
                                   "--principal smtp/HOST)")
    if not principal:
        return Availability(False, "no service principal set (auth.gssapi_principal)")
    try:
        acceptor_credentials(home, principal)
    except Exception as exc:        # any GSS failure: not offered, and said why
        return Availability(False, f"the keytab cannot be used for {principal}: {exc}")
    return Availability(True, "offered", principal)


def acceptor_credentials(home: Path, principal: str):
    import gssapi
    name = gssapi.Name(principal, gssapi.NameType.kerberos_principal)
    return gssapi.Credentials(name=name, usage="accept", store={"keytab": str(home / KEYTAB)})


def user_for(principal: str) -> str:
    """alice@EXAMPLE.ORG -> alice@example.org (instances like alice/admin are refused)."""
    local, _, realm = str(principal).rpartition("@")
    if not local or "/" in local or not realm:
        return ""
    return f"{local}@{realm.lower()}"


def check_keytab(data: bytes) -> None:
    """Raise ValueError unless ``data`` is an MIT keytab with at least one key.

    The layout (MIT ``keytab.txt``): 0x05 then version 1 or 2, then records, each a
    32-bit length (big-endian in v2, native in v1; negative for a deleted hole) and
    that many bytes. Checked by hand so it works without the gssapi package."""
    if len(data) < 2 or data[0] != 5 or data[1] not in (1, 2):
        raise ValueError("not a Kerberos keytab (it must start with bytes 0x05 0x02; "
                         "make one with kadmin's ktadd or ktutil)")
    fmt, pos, keys = (">i" if data[1] == 2 else "=i"), 2, 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError("truncated Kerberos keytab")
        (size,) = struct.unpack_from(fmt, data, pos)
        pos += 4 + abs(size)
        if pos > len(data):
            raise ValueError("truncated Kerberos keytab")
        keys += size > 0
    if not keys:
        raise ValueError("the keytab holds no keys")


def install_keytab(home: Path, keytab: Path) -> None:
    """Copy a keytab in, after :func:`check_keytab` (ValueError) and reading (OSError)."""
    data = keytab.read_bytes()
    check_keytab(data)
    tmp = home / f".{KEYTAB}.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(home / KEYTAB)
