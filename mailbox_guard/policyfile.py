"""The whole policy as one TOML document: read from the store, validated, diffed
and applied in one transaction (``config export`` / ``config import``)."""

from __future__ import annotations

from typing import Any

import tomli_w

from .config import SETTINGS, SettingError, parse_setting
from .store import (PolicyStore, normalise_domain, normalise_network, normalise_next_hop)

FORMAT = 1


def read_policy(store: PolicyStore) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "domains": [{"name": d.name, **({"next_hop": d.next_hop} if d.next_hop else {})}
                    for d in store.domains()],
        "recipients": store.recipients(),
        "networks": [{"cidr": n["cidr"], **({"comment": n["comment"]} if n["comment"] else {})}
                     for n in store.networks()],
        "listeners": [{"name": r["name"], "kind": r["kind"], "address": f"{r['host']}:{r['port']}",
                       **({"require_auth": True} if r["require_auth"] else {}),
                       **({"plaintext_auth": True} if r["plaintext_auth"] else {})}
                      for r in store.listeners()],
        "settings": dict(sorted(store.settings().items())),
    }


def dump_policy(policy: dict[str, Any]) -> str:
    return ("# mailbox_guard policy; `mailbox-guard config import FILE` applies it.\n"
            + tomli_w.dumps(policy))


def parse_policy(doc: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalise a policy document (raises SettingError, one line)."""
    if doc.get("format", FORMAT) != FORMAT:
        raise SettingError(f"policy format {doc.get('format')!r} is not supported (expected {FORMAT})")
    unknown = set(doc) - {"format", "domains", "recipients", "networks", "listeners", "settings"}
    if unknown:
        raise SettingError(f"unknown section(s) in policy: {', '.join(sorted(unknown))}")

    def items(key: str, kind: type) -> list:
        value = doc.get(key, [] if kind is list else {})
        if not isinstance(value, kind):
            raise SettingError(f"'{key}' must be a {'list' if kind is list else 'table'}")
        return value

    domains = []
    for d in items("domains", list):
        if not isinstance(d, dict) or "name" not in d:
            raise SettingError("each [[domains]] entry needs a name")
        domains.append({"name": normalise_domain(d["name"]),
                        **({"next_hop": normalise_next_hop(d["next_hop"])} if d.get("next_hop") else {})})
    names = {d["name"] for d in domains}
    recipients = []
    for r in items("recipients", list):
        local, at, domain = str(r).strip().rpartition("@")
        if not at or not local or normalise_domain(domain) not in names:
            raise SettingError(f"recipient {r!r} must be an address of a listed domain")
        recipients.append(f"{local}@{normalise_domain(domain)}")
    networks = []
    for n in items("networks", list):
        n = n if isinstance(n, dict) else {"cidr": n}
        networks.append({"cidr": normalise_network(n.get("cidr", "")),
                         **({"comment": str(n["comment"])} if n.get("comment") else {})})
    listeners = []
    for entry in items("listeners", list):
        if not isinstance(entry, dict) or not {"name", "kind", "address"} <= set(entry):
            raise SettingError("each [[listeners]] entry needs name, kind and address")
        row = {"name": str(entry["name"]), "kind": str(entry["kind"]), "address": str(entry["address"])}
        for flag in ("require_auth", "plaintext_auth"):
            if entry.get(flag):
                row[flag] = True
        PolicyStore.listener_row(row["name"], row["kind"], row["address"],
                                 require_auth=row.get("require_auth", False),
                                 plaintext_auth=row.get("plaintext_auth", False))
        listeners.append(row)
    settings = {}
    for key, value in items("settings", dict).items():
        parse_setting(key, str(value))
        settings[key] = str(value)
    return {"format": FORMAT, "domains": sorted(domains, key=lambda d: d["name"]),
            "recipients": sorted(set(recipients)), "networks": sorted(networks, key=lambda n: n["cidr"]),
            "listeners": sorted(listeners, key=lambda x: x["name"]), "settings": dict(sorted(settings.items()))}


def diff_policy(current: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable lines: '+ domain x', '- network y', '~ setting k: a -> b'."""
    out: list[str] = []

    def keyed(rows, key):
        return {r[key]: r for r in rows}

    for section, key, label in (("domains", "name", "domain"), ("networks", "cidr", "network"),
                                ("listeners", "name", "listener")):
        cur, new = keyed(current[section], key), keyed(wanted[section], key)
        for k in sorted(cur.keys() - new.keys()):
            out.append(f"- {label} {k}")
        for k in sorted(new.keys() - cur.keys()):
            out.append(f"+ {label} {k} {_attrs(new[k], key)}".rstrip())
        for k in sorted(cur.keys() & new.keys()):
            if cur[k] != new[k]:
                out.append(f"~ {label} {k}: {_attrs(cur[k], key) or '-'} -> {_attrs(new[k], key) or '-'}")
    cur_r, new_r = set(current["recipients"]), set(wanted["recipients"])
    out += [f"- recipient {r}" for r in sorted(cur_r - new_r)]
    out += [f"+ recipient {r}" for r in sorted(new_r - cur_r)]
    cur_s, new_s = current["settings"], wanted["settings"]
    for k in sorted(cur_s.keys() | new_s.keys()):
        a = cur_s.get(k, f"{SETTINGS[k].default} (default)" if k in SETTINGS else None)
        b = new_s.get(k, f"{SETTINGS[k].default} (default)" if k in SETTINGS else None)
        if cur_s.get(k) != new_s.get(k):
            out.append(f"~ setting {k}: {a} -> {b}")
    return out


def _attrs(row: dict, key: str) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items() if k != key)


def apply_policy(store: PolicyStore, wanted: dict[str, Any]) -> None:
    """Replace the whole policy in one transaction (the engine sees one new version)."""
    import time
    with store._tx() as conn:
        conn.execute("DELETE FROM recipients")
        conn.execute("DELETE FROM domains")
        conn.execute("DELETE FROM networks")
        conn.execute("DELETE FROM listeners")
        conn.execute("DELETE FROM settings")
        now = time.time()
        conn.executemany("INSERT INTO domains (name, next_hop, created_at) VALUES (?, ?, ?)",
                         [(d["name"], d.get("next_hop"), now) for d in wanted["domains"]])
        conn.executemany("INSERT INTO recipients (address, domain, created_at) VALUES (?, ?, ?)",
                         [(r, r.rpartition("@")[2], now) for r in wanted["recipients"]])
        conn.executemany("INSERT INTO networks (cidr, comment, created_at) VALUES (?, ?, ?)",
                         [(n["cidr"], n.get("comment", ""), now) for n in wanted["networks"]])
        for entry in wanted["listeners"]:
            row = PolicyStore.listener_row(entry["name"], entry["kind"], entry["address"],
                                           require_auth=entry.get("require_auth", False),
                                           plaintext_auth=entry.get("plaintext_auth", False))
            conn.execute("INSERT INTO listeners (name, kind, host, port, require_auth, plaintext_auth) "
                         "VALUES (:name, :kind, :host, :port, :require_auth, :plaintext_auth)", row)
        conn.executemany("INSERT INTO settings (key, value) VALUES (?, ?)",
                         list(wanted["settings"].items()))
