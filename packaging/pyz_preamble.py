"""Runs inside mailbox-guard.pyz after shiv has extracted it and before the CLI.

The archive holds compiled wheels for one CPython minor version and one platform
(``packaging/build-pyz`` records which in ``bin/pyz-target.json``). On any other
interpreter the first compiled import would fail deep inside a traceback; say so
in one line instead, with the way out. shiv passes ``site_packages`` in.
"""

import json
import os
import platform
import sys
from pathlib import Path

_target = json.loads((Path(site_packages) / "bin" / "pyz-target.json").read_text())  # noqa: F821


def _problem():
    here = sys.implementation.name
    version = "%d.%d" % sys.version_info[:2]
    if _target["exact_python"] and (here != _target["implementation"] or version != _target["python"]):
        return f"this is {here} {version}"
    if sys.platform != _target["platform"] or platform.machine() not in _target["machines"]:
        return f"this is {sys.platform} {platform.machine()}"
    if _target["glibc"]:
        try:
            libc, have = os.confstr("CS_GNU_LIBC_VERSION").split()
        except (ValueError, OSError, AttributeError):
            return "this C library is not glibc"
        if tuple(map(int, have.split(".")[:2])) < tuple(map(int, _target["glibc"].split("."))):
            return f"this is glibc {have}"
    return None


_why = _problem()
if _why:
    _glibc = f", glibc >= {_target['glibc']}" if _target["glibc"] else ""
    sys.exit(f"mailbox-guard.pyz: built for CPython {_target['python']} on {_target['platform']} "
             f"{'/'.join(_target['machines'])}{_glibc}; {_why}. "
             f"Build one for this interpreter: packaging/build-pyz --python {sys.executable}")
