"""GSSAPI (Kerberos) for SMTP AUTH, RFC 4752, with the ``gssapi`` package.

The admin installs a keytab and names the service principal
(``mailbox-guard auth gssapi --keytab F --principal smtp/mail.example.org``). When the
package is missing or no keytab is installed, GSSAPI is not offered and
:func:`availability` says why (``status`` shows it). A Kerberos principal
``alice@EXAMPLE.ORG`` logs in as the user ``alice@example.org``.
"""

from __future__ import annotations

import os
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


def install_keytab(home: Path, keytab: Path) -> None:
    data = keytab.read_bytes()
    tmp = home / f".{KEYTAB}.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(home / KEYTAB)
