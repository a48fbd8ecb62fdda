"""The whole policy as one TOML document (``config export`` / ``config import``): read
from the store, validated, merged, diffed and applied in one transaction.

The document is a backup: settings, the server's password policy, domains with every
option (next hop, anti-impersonation, legacy SASL mechanisms, password policy),
recipients, trusted networks, listeners, users with their password hashes, derived
SASL secrets and aliases, the settings of domains and users (``scoped_settings``) and
the check modes (``check_modes``). An import replaces only the sections the file has;
the others are left alone unless ``replace`` is asked for.

Which checks exist is not the store's to know: the caller passes them to
:func:`parse_policy` (name -> whether its mode is fixed) to have check modes checked.
"""

from __future__ import annotations

import re
import time
from typing import Any, Mapping

import tomli_w

from mailbox_guard.config import SETTINGS, SettingError, parse_setting
from mailbox_guard.store.db import (LEGACY_MECHANISMS, PolicyStore, normalise_address, normalise_domain,
                                    normalise_network, normalise_next_hop, normalise_scope, normalise_user,
                                    open_relay_networks, parse_mode, parse_scoped_setting)

FORMAT = 1
SECTIONS = ("settings", "password_policy", "domains", "recipients", "networks", "listeners", "users",
            "scoped_settings", "check_modes")
LEGACY = tuple(sorted(LEGACY_MECHANISMS))
_DEFAULT_POLICY = {"min_length": 12, "min_classes": 3, "reject_common": True, "reject_name": True}


# The normalised state, one entry per section: settings {key: text}; password_policy
# {field: value}; domains {name: {next_hop, anti_impersonation, mechanisms, password_policy}};
# recipients [address]; networks {cidr: {comment}}; listeners {name: {kind, address,
# require_auth, plaintext_auth}}; users {name: {domain, disabled, password_hash,
# changed_at, aliases, secrets}}; scoped_settings {scope: {key: text}}; check_modes
# {scope: {check: mode}} (scope '' is the server).
def _policy(row) -> dict:
    return {"min_length": int(row["min_length"]), "min_classes": int(row["min_classes"]),
            "reject_common": bool(row["reject_common"]), "reject_name": bool(row["reject_name"])}


def read_state(store: PolicyStore) -> dict[str, Any]:
    """Everything the policy holds, in one read transaction."""
    with store._tx() as conn:
        policies = {r["scope"].lower(): _policy(r) for r in conn.execute("SELECT * FROM password_policy")}
        mechanisms: dict[str, list[str]] = {}
        for r in conn.execute("SELECT domain, mechanism FROM domain_mechanisms ORDER BY mechanism"):
            mechanisms.setdefault(r[0].lower(), []).append(r[1])
        domains = {r["name"]: {"next_hop": r["next_hop"], "anti_impersonation": bool(r["anti_impersonation"]),
                               "mechanisms": mechanisms.get(r["name"].lower(), []),
                               "password_policy": policies.get(r["name"].lower())}
                   for r in conn.execute("SELECT name, next_hop, anti_impersonation FROM domains ORDER BY name")}
        aliases: dict[str, list[str]] = {}
        for r in conn.execute("SELECT user, address FROM user_aliases ORDER BY address"):
            aliases.setdefault(r[0].lower(), []).append(r[1])
        secrets: dict[str, dict[str, str]] = {}
        for r in conn.execute("SELECT user, mechanism, secret FROM user_secrets ORDER BY mechanism"):
            secrets.setdefault(r[0].lower(), {})[r[1]] = r[2]
        users = {r["name"]: {"domain": r["domain"], "disabled": bool(r["disabled"]),
                             "password_hash": r["password_hash"], "changed_at": float(r["changed_at"]),
                             "aliases": aliases.get(r["name"].lower(), []),
                             "secrets": secrets.get(r["name"].lower(), {})}
                 for r in conn.execute("SELECT * FROM users ORDER BY name")}
        return {
            "settings": {r[0]: r[1] for r in conn.execute("SELECT key, value FROM settings ORDER BY key")},
            "password_policy": policies.get("*", dict(_DEFAULT_POLICY)),
            "domains": domains,
            "recipients": [r[0] for r in conn.execute("SELECT address FROM recipients ORDER BY address")],
            "networks": {r[0]: {"comment": r[1]} for r in conn.execute("SELECT cidr, comment FROM networks "
                                                                       "ORDER BY cidr")},
            "listeners": {r["name"]: {"kind": r["kind"], "address": _address(r["host"], r["port"]),
                                      "require_auth": bool(r["require_auth"]),
                                      "plaintext_auth": bool(r["plaintext_auth"])}
                          for r in conn.execute("SELECT * FROM listeners ORDER BY name")},
            "users": users,
            "scoped_settings": _by_scope(conn.execute("SELECT scope, key, value FROM scoped_settings")),
            "check_modes": _by_scope(conn.execute("SELECT scope, check_name, mode FROM check_modes")),
        }


def _by_scope(rows) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for scope, name, value in rows:
        out.setdefault(scope.lower(), {})[name] = value
    return {scope: dict(sorted(out[scope].items())) for scope in sorted(out)}


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ------------------------------------------------------------------ the document
def to_document(state: dict[str, Any]) -> dict[str, Any]:
    """The TOML document of a state (every section, defaults written out)."""
    domains = []
    for name, d in state["domains"].items():
        entry: dict[str, Any] = {"name": name}
        if d["next_hop"]:
            entry["next_hop"] = d["next_hop"]
        entry["anti_impersonation"] = d["anti_impersonation"]
        entry["mechanisms"] = list(d["mechanisms"])
        if d["password_policy"]:
            entry["password_policy"] = dict(d["password_policy"])
        domains.append(entry)
    users = []
    for name, u in state["users"].items():
        users.append({"name": name, "disabled": u["disabled"], "password_hash": u["password_hash"],
                      "changed_at": u["changed_at"], "aliases": list(u["aliases"]),
                      "secrets": dict(u["secrets"])})
    return {
        "format": FORMAT,
        "recipients": list(state["recipients"]),
        "settings": dict(state["settings"]),
        "password_policy": dict(state["password_policy"]),
        "domains": domains,
        "networks": [{"cidr": c, **({"comment": n["comment"]} if n["comment"] else {})}
                     for c, n in state["networks"].items()],
        "listeners": [{"name": n, "kind": r["kind"], "address": r["address"],
                       **({"require_auth": True} if r["require_auth"] else {}),
                       **({"plaintext_auth": True} if r["plaintext_auth"] else {})}
                      for n, r in state["listeners"].items()],
        "users": users,
        "scoped_settings": {scope: dict(values) for scope, values in state["scoped_settings"].items()},
        "check_modes": [{"check": check, "mode": mode, **({"scope": scope} if scope else {})}
                        for scope, modes in state["check_modes"].items() for check, mode in modes.items()],
    }


def read_policy(store: PolicyStore) -> dict[str, Any]:
    return to_document(read_state(store))


def dump_policy(policy: dict[str, Any]) -> str:
    return ("# mailbox_guard policy; `mailbox-guard config import FILE` applies it.\n"
            "# It holds password hashes and SASL secrets: keep it as safe as the store.\n"
            + tomli_w.dumps(policy))


def parse_policy(doc: dict[str, Any], *, checks: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """Validate and normalise a document into the sections it has (SettingError, one
    line). ``checks``: the checks there are (name -> its mode is fixed); given, check
    modes must name one of them and leave a fixed one enforced."""
    if "format" not in doc:
        raise SettingError("not a mailbox-guard policy file: no 'format' key "
                           f"(`mailbox-guard config export` writes format = {FORMAT})")
    if type(doc["format"]) is not int or doc["format"] != FORMAT:      # not true, not 1.0
        raise SettingError(f"policy format {doc['format']!r} is not supported (this mailbox-guard "
                           f"reads format {FORMAT})")
    unknown = set(doc) - {"format", *SECTIONS}
    if unknown:
        raise SettingError(f"unknown section(s) in policy: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for section in SECTIONS:
        if section in doc:
            out[section] = _PARSERS[section](doc[section])
    if checks is not None:
        for scope, modes in out.get("check_modes", {}).items():
            for check, mode in modes.items():
                if check not in checks:
                    raise SettingError(f"check_modes: unknown check {check!r} (`mailbox-guard checks list` "
                                       "shows them)")
                if checks[check] and mode != "enforce":
                    raise SettingError(f"check_modes: {check} is always enforced; it cannot be {mode}")
    return out


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise SettingError(f"{what} must be a {'list' if kind is list else 'table' if kind is dict else kind.__name__}")
    return value


def _entries(value: Any, section: str, key: str) -> list[dict]:
    out = []
    for entry in _expect(value, list, f"'{section}'"):
        if not isinstance(entry, dict) or key not in entry:
            raise SettingError(f"each [[{section}]] entry needs a {key}")
        out.append(entry)
    return out


def _unique(items: dict, key: str, what: str) -> None:
    if key in items:
        raise SettingError(f"{what} {key} is listed twice")


def _parse_settings(value: Any) -> dict[str, str]:
    settings = {}
    for key, text in _expect(value, dict, "'settings'").items():
        parse_setting(key, str(text))
        settings[key] = str(text)
    return dict(sorted(settings.items()))


def _parse_password_policy(value: Any, scope: str = "server") -> dict:
    value = _expect(value, dict, f"password_policy ({scope})")
    unknown = set(value) - set(_DEFAULT_POLICY)
    if unknown:
        raise SettingError(f"unknown password_policy field(s) ({scope}): {', '.join(sorted(unknown))}")
    policy = {**_DEFAULT_POLICY, **value}
    if not isinstance(policy["min_length"], int) or not 8 <= policy["min_length"] <= 1024:
        raise SettingError(f"password_policy ({scope}): min_length must be between 8 and 1024")
    if not isinstance(policy["min_classes"], int) or not 1 <= policy["min_classes"] <= 4:
        raise SettingError(f"password_policy ({scope}): min_classes must be between 1 and 4")
    return _policy(policy)


def _parse_domains(value: Any) -> dict[str, dict]:
    domains: dict[str, dict] = {}
    for d in _entries(value, "domains", "name"):
        name = normalise_domain(d["name"])
        _unique(domains, name, "domain")
        unknown = set(d) - {"name", "next_hop", "anti_impersonation", "mechanisms", "password_policy"}
        if unknown:
            raise SettingError(f"domain {name}: unknown field(s) {', '.join(sorted(unknown))}")
        mechanisms = sorted({str(m).upper() for m in _expect(d.get("mechanisms", []), list,
                                                              f"domain {name}: mechanisms")})
        if set(mechanisms) - set(LEGACY):
            raise SettingError(f"domain {name}: only {', '.join(LEGACY)} are switched per domain")
        domains[name] = {"next_hop": normalise_next_hop(d.get("next_hop")),
                         "anti_impersonation": bool(d.get("anti_impersonation", True)),
                         "mechanisms": mechanisms,
                         "password_policy": (_parse_password_policy(d["password_policy"], name)
                                             if "password_policy" in d else None)}
    return dict(sorted(domains.items()))


def _parse_recipients(value: Any) -> list[str]:
    return sorted({normalise_address(r) for r in _expect(value, list, "'recipients'")}, key=str.lower)


def _parse_networks(value: Any) -> dict[str, dict]:
    networks: dict[str, dict] = {}
    for n in _expect(value, list, "'networks'"):
        n = n if isinstance(n, dict) else {"cidr": n}
        cidr = normalise_network(n.get("cidr", ""))
        _unique(networks, cidr, "network")
        networks[cidr] = {"comment": str(n.get("comment", ""))}
    return dict(sorted(networks.items()))


def _parse_listeners(value: Any) -> dict[str, dict]:
    listeners: dict[str, dict] = {}
    for entry in _entries(value, "listeners", "name"):
        if not {"kind", "address"} <= set(entry):
            raise SettingError("each [[listeners]] entry needs name, kind and address")
        row = PolicyStore.listener_row(str(entry["name"]), str(entry["kind"]), str(entry["address"]),
                                       require_auth=bool(entry.get("require_auth")),
                                       plaintext_auth=bool(entry.get("plaintext_auth")))
        _unique(listeners, row["name"], "listener")
        listeners[row["name"]] = {"kind": row["kind"], "address": _address(row["host"], row["port"]),
                                  "require_auth": row["require_auth"], "plaintext_auth": row["plaintext_auth"]}
    return dict(sorted(listeners.items()))


def _parse_users(value: Any) -> dict[str, dict]:
    users: dict[str, dict] = {}
    for u in _entries(value, "users", "name"):
        name, domain = normalise_user(u["name"])
        _unique(users, name, "user")
        hashed = u.get("password_hash")
        if not isinstance(hashed, str) or not hashed.startswith("$argon2"):
            raise SettingError(f"user {name}: password_hash must be an argon2 hash as exported")
        secrets = _expect(u.get("secrets", {}), dict, f"user {name}: secrets")
        if any(not re.fullmatch(r"[A-Z0-9-]{1,40}", str(m)) or not isinstance(s, str) for m, s in secrets.items()):
            raise SettingError(f"user {name}: secrets must map mechanism names to text")
        changed = u.get("changed_at", time.time())
        if not isinstance(changed, (int, float)):
            raise SettingError(f"user {name}: changed_at must be a number (seconds since the epoch)")
        users[name] = {"domain": domain, "disabled": bool(u.get("disabled", False)), "password_hash": hashed,
                       "changed_at": float(changed),
                       "aliases": sorted({normalise_user(a)[0] for a in _expect(u.get("aliases", []), list,
                                                                              f"user {name}: aliases")}),
                       "secrets": dict(sorted(secrets.items()))}
    return dict(sorted(users.items()))


def _parse_scoped_settings(value: Any) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for scope, values in _expect(value, dict, "'scoped_settings'").items():
        name = normalise_scope(scope)
        if not name:
            raise SettingError("scoped_settings: the server's settings go in [settings]")
        _unique(out, name, "scoped_settings scope")
        entries = {}
        for key, text in _expect(values, dict, f"scoped_settings {name}").items():
            try:
                parse_scoped_setting(key, str(text))
            except SettingError as exc:
                raise SettingError(f"scoped_settings {name}: {exc}") from None
            entries[key] = str(text)
        if entries:
            out[name] = dict(sorted(entries.items()))
    return dict(sorted(out.items()))


def _parse_check_modes(value: Any) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for entry in _entries(value, "check_modes", "check"):
        unknown = set(entry) - {"check", "mode", "scope"}
        if unknown or "mode" not in entry:
            raise SettingError("each [[check_modes]] entry has check, mode and optionally scope "
                               f"(got {', '.join(sorted(entry))})")
        check, scope = str(entry["check"]), normalise_scope(str(entry.get("scope", "")))
        modes = out.setdefault(scope, {})
        if check in modes:
            raise SettingError(f"check_modes: {check} at {scope or 'the server'} is listed twice")
        modes[check] = parse_mode(str(entry["mode"]))
    return {scope: dict(sorted(out[scope].items())) for scope in sorted(out)}


_PARSERS = {"settings": _parse_settings, "password_policy": _parse_password_policy,
            "domains": _parse_domains, "recipients": _parse_recipients, "networks": _parse_networks,
            "listeners": _parse_listeners, "users": _parse_users,
            "scoped_settings": _parse_scoped_settings, "check_modes": _parse_check_modes}
EMPTY: dict[str, Any] = {"settings": {}, "password_policy": dict(_DEFAULT_POLICY), "domains": {},
                         "recipients": [], "networks": {}, "listeners": {}, "users": {},
                         "scoped_settings": {}, "check_modes": {}}


# ------------------------------------------------------------------ merge, diff, apply
def merge(current: dict[str, Any], sections: dict[str, Any], *, replace: bool = False,
          force: bool = False) -> dict[str, Any]:
    """The policy after an import: each section of the file replaces the store's, the
    others stay (or are emptied with ``replace``). Checks that the result holds
    together; recipients and users of a domain that goes are dropped with it, as by
    `domains remove` (the diff shows them), unless the file lists them."""
    wanted = {s: sections[s] if s in sections else (EMPTY[s] if replace else current[s]) for s in SECTIONS}
    domains = {d.lower() for d in wanted["domains"]}
    kept = [r for r in wanted["recipients"] if r.rpartition("@")[2].lower() in domains]
    if len(kept) < len(wanted["recipients"]) and "recipients" in sections:
        orphan = next(r for r in wanted["recipients"] if r not in set(kept))
        raise SettingError(f"recipient {orphan} is not an address of a domain in the policy")
    wanted["recipients"] = kept
    owners: dict[str, str] = {}
    users, names = {}, {n.lower() for n in wanted["users"]}
    for name, u in wanted["users"].items():
        if u["domain"].lower() not in domains:
            if "users" in sections:
                raise SettingError(f"user {name} is not of a domain in the policy")
            continue
        for alias in u["aliases"]:
            if alias.lower() in names:
                raise SettingError(f"alias {alias} of {name} is a user of its own")
            if owners.setdefault(alias.lower(), name) != name:
                raise SettingError(f"alias {alias} belongs to both {owners[alias.lower()]} and {name}")
        # A legacy mechanism's secret lives only while the domain has it switched on
        # (as `users mechanism ... off` deletes them).
        enabled = set(wanted["domains"].get(u["domain"], {}).get("mechanisms", ()))
        users[name] = {**u, "secrets": {m: s for m, s in u["secrets"].items() if m not in LEGACY or m in enabled}}
    wanted["users"] = users
    # Settings and modes of a domain that goes, and of its addresses, go with it
    # (as `domains remove` does); a file that gives them for a domain it lacks is wrong.
    for section, label in (("scoped_settings", "scoped_settings"), ("check_modes", "check_modes")):
        kept = {}
        for scope, values in wanted[section].items():
            domain = scope.rpartition("@")[2]
            if scope and domain not in domains:
                if section in sections:
                    raise SettingError(f"{label}: {scope} is not a domain in the policy, nor an address of one")
                continue
            kept[scope] = values
        wanted[section] = kept
    opened = open_relay_networks(set(wanted["networks"]) - set(current["networks"]))
    if opened and not force:
        raise SettingError(f"trusting {opened[0]} would make an open relay; add --force if you mean it")
    return wanted


def diff_policy(current: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable lines: '+ domain x', '- network y', '~ setting k: a -> b'. Never
    shows a password hash or secret."""
    out: list[str] = []
    cur_s, new_s = current["settings"], wanted["settings"]
    for k in sorted(cur_s.keys() | new_s.keys()):
        if cur_s.get(k) != new_s.get(k):
            out.append(f"~ setting {k}: {_setting(cur_s, k)} -> {_setting(new_s, k)}")
    if current["password_policy"] != wanted["password_policy"]:
        out.append(f"~ password policy (server): {_attrs(current['password_policy'])} -> "
                   f"{_attrs(wanted['password_policy'])}")
    for section, label, show in (("domains", "domain", _domain), ("networks", "network", _attrs),
                                 ("listeners", "listener", _attrs), ("users", "user", _user)):
        cur, new = current[section], wanted[section]
        out += [f"- {label} {k}" for k in sorted(cur.keys() - new.keys())]
        out += [f"+ {label} {k} {show(new[k])}".rstrip() for k in sorted(new.keys() - cur.keys())]
        for k in sorted(cur.keys() & new.keys()):
            a, b = cur[k], new[k]
            if a == b:
                continue
            parts = [f"{show(a) or '-'} -> {show(b) or '-'}"] if show(a) != show(b) else []
            if section == "users" and (a["password_hash"], a["changed_at"]) != (b["password_hash"], b["changed_at"]):
                parts.append("password changed")
            elif section == "users" and a["secrets"] != b["secrets"]:
                parts.append(f"SASL secrets {','.join(a['secrets']) or '-'} -> {','.join(b['secrets']) or '-'}")
            out.append(f"~ {label} {k}: {'; '.join(parts)}")
    cur_r, new_r = set(current["recipients"]), set(wanted["recipients"])
    out += [f"- recipient {r}" for r in sorted(cur_r - new_r)]
    out += [f"+ recipient {r}" for r in sorted(new_r - cur_r)]
    for section, label, absent in (("scoped_settings", "setting", "(unset)"), ("check_modes", "check", "(default)")):
        cur, new = current[section], wanted[section]
        for scope in sorted(cur.keys() | new.keys()):
            a, b = cur.get(scope, {}), new.get(scope, {})
            for name in sorted(a.keys() | b.keys()):
                if a.get(name) != b.get(name):
                    out.append(f"~ {label} {name} for {scope or 'the server'}: {a.get(name, absent)} -> "
                               f"{b.get(name, absent)}")
    return out


def _setting(values: dict, key: str) -> str:
    if key in values:
        return values[key]
    return f"{SETTINGS[key].default} (default)" if key in SETTINGS else "(unset)"


def _attrs(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items() if v not in ("", None, False))


def _domain(d: dict) -> str:
    parts = [f"next_hop={d['next_hop']}"] if d["next_hop"] else []
    if not d["anti_impersonation"]:
        parts.append("anti_impersonation=off")
    if d["mechanisms"]:
        parts.append(f"mechanisms={','.join(d['mechanisms'])}")
    if d["password_policy"]:
        parts.append(f"password_policy=({_attrs(d['password_policy'])})")
    return " ".join(parts)


def _user(u: dict) -> str:
    parts = ["disabled"] if u["disabled"] else []
    if u["aliases"]:
        parts.append(f"aliases={','.join(u['aliases'])}")
    return " ".join(parts)


def apply_policy(store: PolicyStore, current: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Make the store hold ``wanted`` in one transaction (the engine sees one new version);
    sections equal to ``current`` are not touched."""
    now = time.time()
    with store._tx() as conn:
        if current["settings"] != wanted["settings"]:
            conn.execute("DELETE FROM settings")
            conn.executemany("INSERT INTO settings (key, value) VALUES (?, ?)", list(wanted["settings"].items()))
        if current["password_policy"] != wanted["password_policy"]:
            _set_policy(conn, "*", wanted["password_policy"])
        if current["domains"] != wanted["domains"]:
            gone = [(d,) for d in current["domains"].keys() - wanted["domains"].keys()]
            conn.executemany("DELETE FROM domains WHERE name = ?", gone)      # cascades recipients
            conn.executemany("DELETE FROM password_policy WHERE scope = ?", gone)
            for name, d in wanted["domains"].items():
                conn.execute("INSERT INTO domains (name, next_hop, anti_impersonation, created_at) "
                             "VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET next_hop = excluded.next_hop, "
                             "anti_impersonation = excluded.anti_impersonation",
                             (name, d["next_hop"], int(d["anti_impersonation"]), now))
                conn.execute("DELETE FROM domain_mechanisms WHERE domain = ?", (name,))
                conn.executemany("INSERT INTO domain_mechanisms (domain, mechanism) VALUES (?, ?)",
                                 [(name, m) for m in d["mechanisms"]])
                conn.execute("DELETE FROM password_policy WHERE scope = ?", (name,))
                if d["password_policy"]:
                    _set_policy(conn, name, d["password_policy"])
        cur_r, new_r = set(current["recipients"]), set(wanted["recipients"])
        conn.executemany("DELETE FROM recipients WHERE address = ?", [(r,) for r in cur_r - new_r])
        conn.executemany("INSERT OR IGNORE INTO recipients (address, domain, created_at) VALUES (?, ?, ?)",
                         [(r, r.rpartition("@")[2], now) for r in sorted(new_r - cur_r)])
        if current["networks"] != wanted["networks"]:
            conn.execute("DELETE FROM networks")
            conn.executemany("INSERT INTO networks (cidr, comment, created_at) VALUES (?, ?, ?)",
                             [(c, n["comment"], now) for c, n in wanted["networks"].items()])
        if current["listeners"] != wanted["listeners"]:
            conn.execute("DELETE FROM listeners")
            for name, entry in wanted["listeners"].items():
                row = PolicyStore.listener_row(name, entry["kind"], entry["address"],
                                               require_auth=entry["require_auth"],
                                               plaintext_auth=entry["plaintext_auth"])
                conn.execute("INSERT INTO listeners (name, kind, host, port, require_auth, plaintext_auth) "
                             "VALUES (:name, :kind, :host, :port, :require_auth, :plaintext_auth)", row)
        if current["users"] != wanted["users"]:
            conn.executemany("DELETE FROM users WHERE name = ?",       # cascades aliases and secrets
                             [(u,) for u in current["users"].keys() - wanted["users"].keys()])
            for name, u in wanted["users"].items():
                conn.execute("INSERT INTO users (name, domain, password_hash, disabled, created_at, changed_at) "
                             "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET domain = excluded.domain, "
                             "password_hash = excluded.password_hash, disabled = excluded.disabled, "
                             "changed_at = excluded.changed_at",
                             (name, u["domain"], u["password_hash"], int(u["disabled"]), now, u["changed_at"]))
                conn.execute("DELETE FROM user_aliases WHERE user = ?", (name,))
                conn.execute("DELETE FROM user_secrets WHERE user = ?", (name,))
            conn.executemany("INSERT INTO user_aliases (address, user) VALUES (?, ?)",
                             [(a, n) for n, u in wanted["users"].items() for a in u["aliases"]])
            conn.executemany("INSERT INTO user_secrets (user, mechanism, secret) VALUES (?, ?, ?)",
                             [(n, m, s) for n, u in wanted["users"].items() for m, s in u["secrets"].items()])
        for section, table, columns in (("scoped_settings", "scoped_settings", "scope, key, value"),
                                        ("check_modes", "check_modes", "scope, check_name, mode")):
            if current[section] != wanted[section]:
                conn.execute(f"DELETE FROM {table}")
                conn.executemany(f"INSERT INTO {table} ({columns}) VALUES (?, ?, ?)",
                                 [(scope, name, value) for scope, values in wanted[section].items()
                                  for name, value in values.items()])


def _set_policy(conn, scope: str, p: dict) -> None:
    conn.execute("INSERT INTO password_policy (scope, min_length, min_classes, reject_common, reject_name) "
                 "VALUES (?, ?, ?, ?, ?) ON CONFLICT(scope) DO UPDATE SET min_length = excluded.min_length, "
                 "min_classes = excluded.min_classes, reject_common = excluded.reject_common, "
                 "reject_name = excluded.reject_name",
                 (scope, p["min_length"], p["min_classes"], int(p["reject_common"]), int(p["reject_name"])))
