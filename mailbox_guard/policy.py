"""The immutable policy snapshot the engine decides with.

The engine loads a :class:`Policy` from the store and swaps the whole object when the
store's ``policy_version`` changes (within a second, or at once on SIGHUP); a session
keeps the snapshot it started a transaction with. Nothing here touches SQLite: the
loader takes plain rows, so checks that read the policy need no database.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .config import Settings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Domain:
    name: str
    next_hop: str | None          # "host:port", None = by MX
    has_recipient_list: bool
    anti_impersonation: bool = True


@dataclass(frozen=True)
class Policy:
    version: int
    settings: Settings
    domains: Mapping[str, Domain] = field(default_factory=dict)
    recipients: frozenset[str] = frozenset()         # lower-cased full addresses
    trusted_networks: tuple[IPNetwork, ...] = ()
    legacy_mechanisms: frozenset[str] = frozenset()   # enabled by at least one domain
    legacy_realms: Mapping[str, frozenset[str]] = field(default_factory=dict)   # mechanism -> domains

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

    @classmethod
    def from_rows(cls, version: int, *, domains: Iterable[tuple],
                  recipients: Iterable[str], networks: Iterable[str],
                  settings: Mapping[str, str],
                  legacy_mechanisms: Iterable[tuple[str, str]] = ()) -> "Policy":
        recipient_set = frozenset(r.lower() for r in recipients)
        with_lists = {r.rpartition("@")[2] for r in recipient_set}
        doms = {}
        for row in domains:
            name, hop = row[0].lower(), row[1]
            doms[name] = Domain(name, hop, name in with_lists, bool(row[2]) if len(row) > 2 else True)
        nets = []
        for cidr in networks:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                continue   # validated on the way in; a hand-edited bad row trusts nothing
        return cls(version=version, settings=Settings(settings), domains=doms,
                   recipients=recipient_set, trusted_networks=tuple(nets),
                   legacy_mechanisms=frozenset(m for _, m in legacy_mechanisms),
                   legacy_realms={m: frozenset(d for d, mm in legacy_mechanisms if mm == m)
                                  for _, m in legacy_mechanisms})
