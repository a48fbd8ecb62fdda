"""DIGEST-MD5 (RFC 2831) for the server side, authentication only (qop=auth).

A legacy mechanism, off unless a domain switches it on; the server keeps only
H(user:realm:password) for it (password-equivalent, but not the password). No
well-kept Python library implements the server side, so the message handling is
here; the hashing is the standard library's. The realm is the user's domain."""

from __future__ import annotations

import hashlib
import hmac
import re

_DIRECTIVE = re.compile(r'\s*([A-Za-z0-9-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,]*)\s*(?:,|$)')


class DigestError(ValueError):
    pass


def challenge(realms: list[str], nonce: str) -> str:
    parts = [f'realm="{r}"' for r in realms]
    parts += [f'nonce="{nonce}"', 'qop="auth"', "charset=utf-8", "algorithm=md5-sess"]
    return ",".join(parts)


def parse(response: str) -> dict[str, str]:
    """The client's directives; a repeated directive or garbage is an error."""
    out: dict[str, str] = {}
    pos = 0
    text = response.strip()
    while pos < len(text):
        m = _DIRECTIVE.match(text, pos)
        if not m or m.end() == pos:
            raise DigestError("malformed DIGEST-MD5 response")
        key, value = m.group(1).lower(), m.group(2).strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if key in out:
            raise DigestError(f"repeated directive {key}")
        out[key] = value
        pos = m.end()
    return out


def _kd(secret_hex: str, data: str) -> str:
    return hashlib.md5(f"{secret_hex}:{data}".encode()).hexdigest()


def _a1_hex(user_realm_pass_hex: str, nonce: str, cnonce: str, authzid: str | None) -> str:
    a1 = bytes.fromhex(user_realm_pass_hex) + f":{nonce}:{cnonce}".encode()
    if authzid:
        a1 += f":{authzid}".encode()
    return hashlib.md5(a1).hexdigest()


def verify(d: dict[str, str], *, nonce: str, secret_hex: str, service: str = "smtp") -> str | None:
    """The rspauth value for the client when its response is right, else None."""
    required = ("username", "nonce", "cnonce", "nc", "response", "digest-uri")
    if any(k not in d for k in required) or d["nonce"] != nonce or d.get("qop", "auth") != "auth":
        return None
    if not d["digest-uri"].lower().startswith(f"{service}/"):
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{32}", d["response"]):
        return None
    authzid = d.get("authzid")
    ha1 = _a1_hex(secret_hex, nonce, d["cnonce"], authzid)
    ha2 = hashlib.md5(f"AUTHENTICATE:{d['digest-uri']}".encode()).hexdigest()
    expected = _kd(ha1, f"{nonce}:{d['nc']}:{d['cnonce']}:auth:{ha2}")
    if not hmac.compare_digest(expected.encode(), d["response"].lower().encode()):
        return None
    ha2_server = hashlib.md5(f":{d['digest-uri']}".encode()).hexdigest()
    return _kd(ha1, f"{nonce}:{d['nc']}:{d['cnonce']}:auth:{ha2_server}")
