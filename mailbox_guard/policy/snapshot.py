"""The immutable policy snapshot the engine decides with.

The engine builds a :class:`Policy` from named sections read by the store
(:func:`mailbox_guard.store.db.policy_sections`) and swaps the whole object when the
store's ``policy_version`` changes (within a second, or at once on SIGHUP). A
transaction keeps the snapshot it started with, from MAIL to the end of DATA.

Settings have scopes: the server, a domain, a user (a full address). A user's value
wins over its domain's, a domain's over the server's: :meth:`Policy.scope` gives the
merged view for one recipient in one lookup. Check modes follow the same levels.
Nothing here touches SQLite.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from mailbox_guard.config import SETTINGS, SettingError, Settings
from mailbox_guard.model import Mode

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SERVER = ""          # the scope name of the server level


@dataclass(frozen=True)
class Domain:
    name: str
    next_hop: str | None          # "host:port", None = by MX
    has_recipient_list: bool
    anti_impersonation: bool = True


@dataclass(frozen=True)
class Scope:
    """The policy as it applies to one recipient: its level ("server", "domain" or
    "user"), the name of that level, and the settings and check modes merged from
    the server down to it."""
    level: str
    name: str
    values: Mapping[str, Any]
    modes: Mapping[str, Mode]
    # What decisions derive from this scope once (it lives as long as its snapshot).
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def mode(self, check: str, default: Mode = Mode.ENFORCE) -> Mode:
        return self.modes.get(check, default)

    @property
    def label(self) -> str:
        return self.level if self.level == "server" else f"{self.level} {self.name}"


@dataclass(frozen=True)
class Policy:
    version: int
    settings: Settings
    domains: Mapping[str, Domain] = field(default_factory=dict)
    recipients: frozenset[str] = frozenset()         # lower-cased full addresses
    trusted_networks: tuple[IPNetwork, ...] = ()
    legacy_mechanisms: frozenset[str] = frozenset()   # enabled by at least one domain
    legacy_realms: Mapping[str, frozenset[str]] = field(default_factory=dict)   # mechanism -> domains
    scoped: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)       # scope -> parsed overrides
    modes: Mapping[str, Mapping[str, Mode]] = field(default_factory=dict)       # scope -> check -> mode
    _scopes: dict = field(default_factory=dict, compare=False, repr=False)      # memo, by address

    def guarded(self, domain: str) -> Domain | None:
        return self.domains.get(domain.lower())

    def is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted_networks)

    def knows_recipient(self, local: str, domain: str) -> bool:
        return f"{local}@{domain}".lower() in self.recipients

    # ----------------------------------------------------------- scopes
    def scope(self, address: str | None = None) -> Scope:
        """The merged policy for a recipient address (None: the server's)."""
        key = (address or "").lower()
        found = self._scopes.get(key)
        if found is not None:
            return found
        domain = key.rpartition("@")[2] if key else ""
        chain = [SERVER]
        level, name = "server", ""
        if domain and (domain in self.scoped or domain in self.modes):
            chain.append(domain)
            level, name = "domain", domain
        if key and (key in self.scoped or key in self.modes):
            chain.append(key)
            level, name = "user", key
        values: dict[str, Any] = dict(self.settings.items())
        modes: dict[str, Mode] = {}
        for scope in chain:
            values.update(self.scoped.get(scope, {}))
            modes.update(self.modes.get(scope, {}))
        found = Scope(level, name, values, modes)
        if len(self._scopes) < 10000:       # bounded: recipients are attacker-chosen
            self._scopes[key] = found
        return found

    def runs(self, check: str, default: Mode) -> bool:
        """Whether a check runs for a session-level phase: not off at the server, or
        switched on for some domain or user (whose recipients then use its results)."""
        if self.modes.get(SERVER, {}).get(check, default) is not Mode.OFF:
            return True
        return any(m.get(check) not in (None, Mode.OFF) for s, m in self.modes.items() if s != SERVER)

    # ----------------------------------------------------------- loading
    @classmethod
    def from_sections(cls, version: int, *, domains: Iterable[Mapping] = (),
                      recipients: Iterable[str] = (), networks: Iterable[str] = (),
                      settings: Mapping[str, str] | None = None,
                      legacy_mechanisms: Iterable[Mapping] = (),
                      scoped_settings: Iterable[Mapping] = (),
                      check_modes: Iterable[Mapping] = ()) -> "Policy":
        """Build a snapshot from the store's named sections (lists of dicts)."""
        recipient_set = frozenset(r.lower() for r in recipients)
        with_lists = {r.rpartition("@")[2] for r in recipient_set}
        doms = {}
        for row in domains:
            name = row["name"].lower()
            doms[name] = Domain(name, row.get("next_hop"), name in with_lists,
                                bool(row.get("anti_impersonation", True)))
        nets = []
        for cidr in networks:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                continue   # validated on the way in; a hand-edited bad row trusts nothing
        legacy = [(row["domain"], row["mechanism"]) for row in legacy_mechanisms]
        scoped: dict[str, dict[str, Any]] = {}
        for row in scoped_settings:
            setting = SETTINGS.get(row["key"])
            if setting is None or not setting.scoped:
                continue
            try:
                scoped.setdefault(row["scope"].lower(), {})[row["key"]] = setting.parse(row["value"])
            except SettingError:
                continue   # the CLI refuses bad values; a hand-edited one falls back
        modes: dict[str, dict[str, Mode]] = {}
        for row in check_modes:
            try:
                modes.setdefault(row["scope"].lower(), {})[row["check"]] = Mode(row["mode"])
            except ValueError:
                continue
        return cls(version=version, settings=Settings(settings or {}), domains=doms,
                   recipients=recipient_set, trusted_networks=tuple(nets),
                   legacy_mechanisms=frozenset(m for _, m in legacy),
                   legacy_realms={m: frozenset(d for d, mm in legacy if mm == m) for _, m in legacy},
                   scoped=scoped, modes=modes)
