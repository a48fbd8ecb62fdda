"""CRAM-MD5 (RFC 2195) with a derived secret instead of the password.

CRAM-MD5's answer is HMAC-MD5(password, challenge). To check it without keeping the
password, the server keeps what HMAC computes from the key before it sees any data:
the MD5 states after the (key XOR ipad) and (key XOR opad) blocks, as Dovecot's
``CRAM-MD5`` scheme does. Still password-equivalent (a legacy mechanism, off unless a
domain switches it on), but not the password. No library exposes MD5's intermediate
state, so this module carries MD5's compression function (RFC 1321); the tests check
every result against hashlib's and hmac's own.
"""

from __future__ import annotations

import hashlib
import math
import struct

_S = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_K = [int(abs(math.sin(i + 1)) * 2 ** 32) & 0xFFFFFFFF for i in range(64)]
_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MASK = 0xFFFFFFFF


def _compress(state: tuple[int, ...], block: bytes) -> tuple[int, ...]:
    a, b, c, d = state
    m = struct.unpack("<16I", block)
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _MASK)), (7 * i) % 16
        f = (f + a + _K[i] + m[g]) & _MASK
        a, d, c = d, c, b
        b = (b + ((f << _S[i]) | (f >> (32 - _S[i])))) & _MASK
    return tuple((x + y) & _MASK for x, y in zip(state, (a, b, c, d)))


def _md5_from(state: tuple[int, ...], data: bytes, already: int) -> bytes:
    """MD5 digest of (``already`` bytes that produced ``state``) + ``data``."""
    length = (already + len(data)) * 8
    data = data + b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", length & (2 ** 64 - 1))
    for i in range(0, len(data), 64):
        state = _compress(state, data[i:i + 64])
    return struct.pack("<4I", *state)


def derive(password: str) -> str:
    """The stored secret: hex of the inner and outer HMAC-MD5 states."""
    key = password.encode("utf-8")
    if len(key) > 64:
        key = hashlib.md5(key).digest()
    key = key.ljust(64, b"\x00")
    inner = _compress(_IV, bytes(k ^ 0x36 for k in key))
    outer = _compress(_IV, bytes(k ^ 0x5C for k in key))
    return struct.pack("<8I", *inner, *outer).hex()


def expected(secret_hex: str, challenge: bytes) -> str:
    """HMAC-MD5(password, challenge) in hex, from the stored secret."""
    words = struct.unpack("<8I", bytes.fromhex(secret_hex))
    inner_digest = _md5_from(words[:4], challenge, 64)
    return _md5_from(words[4:], inner_digest, 64).hex()
