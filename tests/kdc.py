"""A real MIT Kerberos KDC on loopback for the tests: its own realm, database and
config in a temporary folder, started with ``krb5kdc -n`` and stopped by PID."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

REALM = "EXAMPLE.TEST"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KDC:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.conf = folder / "krb5.conf"
        self.kdc_conf = folder / "kdc.conf"
        self.env = dict(os.environ, KRB5_CONFIG=str(self.conf), KRB5_KDC_PROFILE=str(self.kdc_conf),
                        KRB5CCNAME=f"FILE:{folder / 'ccache'}", KRB5_TRACE="/dev/null")

    def _run(self, *args: str, input: str | None = None) -> None:
        out = subprocess.run(args, env=self.env, input=input, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")

    def start(self) -> "KDC":
        for tool in ("krb5kdc", "kdb5_util", "kadmin.local", "kinit"):
            if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
                raise RuntimeError(f"{tool} is missing (Debian: krb5-kdc krb5-user)")
        f = self.folder
        self.conf.write_text(f"""[libdefaults]
  default_realm = {REALM}
  dns_lookup_kdc = false
  dns_lookup_realm = false
  rdns = false
  dns_canonicalize_hostname = false
  ignore_acceptor_hostname = true
[realms]
  {REALM} = {{
    kdc = 127.0.0.1:{self.port}
  }}
[domain_realm]
  .test = {REALM}
  gw.test = {REALM}
""")
        self.kdc_conf.write_text(f"""[kdcdefaults]
  kdc_ports = {self.port}
  kdc_tcp_ports = {self.port}
[realms]
  {REALM} = {{
    database_name = {f / 'principal'}
    key_stash_file = {f / 'stash'}
    acl_file = {f / 'kadm5.acl'}
    kdc_ports = {self.port}
    kdc_tcp_ports = {self.port}
  }}
[logging]
  kdc = FILE:{f / 'kdc.log'}
""")
        self._run("kdb5_util", "-r", REALM, "create", "-s", "-P", "master-Passw0rd")
        self.proc = subprocess.Popen(["krb5kdc", "-n", "-r", REALM], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("the KDC did not start")

    def add_user(self, name: str, password: str) -> None:
        self._run("kadmin.local", "-r", REALM, "-q", f"addprinc -pw {password} {name}")

    def add_service(self, principal: str, keytab: Path) -> None:
        self._run("kadmin.local", "-r", REALM, "-q", f"addprinc -randkey {principal}")
        self._run("kadmin.local", "-r", REALM, "-q", f"ktadd -k {keytab} {principal}")

    def kinit(self, name: str, password: str) -> None:
        self._run("kinit", f"{name}@{REALM}", input=password + "\n")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
