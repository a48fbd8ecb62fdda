"""The DNS cache of mailbox_guard: one instance per engine, injected everywhere.

Every check that needs DNS (SPF, DKIM, DMARC, DNSBLs, reverse DNS, MX lookups
for relaying) goes through a single :class:`DnsCache`, so that

* answers are cached for the TTL the zone owner asked for (clamped to
  ``[min_ttl, max_ttl]``), and negative answers (NXDOMAIN *and* NODATA, kept
  apart because SPF void-lookup counting needs the difference) for the RFC
  2308 negative TTL: ``min(SOA TTL, SOA MINIMUM)`` from the authority section,
  or ``negative_ttl`` when the server sent no SOA;
* a burst of identical lookups (one message fanning out to several checks,
  or many messages from one sender) costs one query on the wire: concurrent
  callers of the same ``(name, rdtype)`` await one shared in-flight task;
* every failure that is not a definite answer (SERVFAIL, REFUSED, timeout, no
  server reachable, malformed reply) surfaces as :class:`DnsTempError`, which
  callers must turn into a 4xx tempfail — never an accept and never a 5xx.

Temporary errors are deliberately **not cached**: the next caller asks the
network again.  Within one burst the single-flight sharing already stops a
stampede, and caching a failure would only prolong an outage.

The network side is ``dns.asyncresolver.Resolver`` (dnspython): it never
blocks the event loop, retries over TCP when a UDP reply is truncated (TC
bit), and enforces the per-query deadline via ``lifetime``.  dnspython's own
cache is left off; this module is the only cache.

A ``DnsCache`` is meant to be used from one event loop at a time (it holds no
locks); it may be reused by successive loops.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

__all__ = ["DnsError", "DnsTempError", "DnsAnswer", "MxResult", "DnsCache"]

log = logging.getLogger(__name__)

# Per-attempt timeout inside the overall deadline: with a 5 s deadline a lost
# UDP datagram still leaves room for a second try.
_MAX_ATTEMPT_TIMEOUT = 2.0
# RFC 6891 / DNS flag day 2020: large enough for big TXT (SPF, DKIM) answers
# over UDP, small enough to avoid IP fragmentation.  Larger answers use TCP.
_EDNS_PAYLOAD = 1232


class DnsError(Exception):
    """A DNS lookup could not be done (e.g. the name is not a valid DNS name)."""


class DnsTempError(DnsError):
    """No definite answer (SERVFAIL, timeout, no server answered): tempfail."""


@dataclass(frozen=True)
class DnsAnswer:
    name: str  # queried name, lower-case, no trailing dot (root is ".")
    rdtype: str  # "A", "MX", ...
    rcode: str  # "NOERROR" | "NXDOMAIN" | "NODATA"
    records: tuple
    ttl: int  # seconds this answer stays valid (remaining, for cache hits)
    from_cache: bool


@dataclass(frozen=True)
class MxResult:
    domain: str
    status: str  # "ok" | "null_mx" | "nxdomain" | "no_host"
    hosts: tuple[tuple[int, str], ...]


@dataclass
class _Entry:
    answer: DnsAnswer
    expires: float  # in the cache's clock


def _name_text(name: dns.name.Name) -> str:
    """Lower-case text form without the trailing dot; the root is "."."""
    if name == dns.name.root:
        return "."
    return name.to_text(omit_final_dot=True).lower()


def _record_value(rdtype: int, rdata) -> object:
    if rdtype == dns.rdatatype.MX:
        return (int(rdata.preference), _name_text(rdata.exchange))
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rdata.address
    if rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        # RFC 7208 3.3: the character-strings are concatenated with no
        # separator.  Bytes are joined first so a UTF-8 sequence split across
        # strings survives; surrogateescape keeps arbitrary bytes round-trip.
        return b"".join(rdata.strings).decode("utf-8", "surrogateescape")
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS,
                  dns.rdatatype.DNAME):
        return _name_text(rdata.target)
    return rdata.to_text()


class DnsCache:
    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        *,
        timeout: float = 5.0,
        max_entries: int = 50_000,
        min_ttl: int = 0,
        max_ttl: int = 86400,
        negative_ttl: int = 300,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError("need 0 <= min_ttl <= max_ttl")
        if nameservers is None:
            # Production only: reads /etc/resolv.conf once, here, so no file
            # I/O ever happens on the event loop later.
            resolver = dns.asyncresolver.Resolver(configure=True)
        else:
            if not nameservers:
                raise ValueError("nameservers must not be empty")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, int(port)) for ip, port in nameservers
            ]
        resolver.cache = None  # this class is the only cache
        resolver.lifetime = timeout  # the overall deadline of one query
        resolver.timeout = min(timeout, _MAX_ATTEMPT_TIMEOUT)
        resolver.retry_servfail = False  # SERVFAIL -> try next server / give up
        resolver.use_edns(0, 0, _EDNS_PAYLOAD)
        self._resolver = resolver
        self._timeout = timeout
        self._max_entries = max_entries
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        # OrderedDict as LRU: hits move to the end, eviction pops the front.
        self._entries: collections.OrderedDict[tuple[str, int], _Entry] = (
            collections.OrderedDict()
        )
        self._inflight: dict[tuple[str, int], asyncio.Task] = {}
        self._rng = random.Random()
        self._hits = 0
        self._misses = 0
        self._joined = 0
        self._errors = 0

    # -- public API ----------------------------------------------------
    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """Answer for (name, rdtype), from cache or the network.

        Raises DnsTempError when no definite answer could be had, DnsError
        for names/types that cannot be queried at all.
        """
        qname, rdt = self._normalise(name, rdtype)
        key = (_name_text(qname), rdt)
        cached = self._lookup(key)
        if cached is not None:
            return cached

        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is not None and task.get_loop() is loop and not task.done():
            self._joined += 1
        else:
            self._misses += 1
            task = loop.create_task(self._fetch(qname, rdt, key))
            self._inflight[key] = task
            task.add_done_callback(lambda t, key=key: self._fetch_done(key, t))
        # shield: a caller that is cancelled (e.g. SMTP session dropped) must
        # not cancel the lookup other callers are waiting on.
        return await asyncio.shield(task)

    async def resolve_addresses(self, host: str) -> list[str]:
        """A addresses then AAAA addresses of host; [] if it has none.

        If one family fails temporarily but the other has addresses, those
        are returned (enough to connect); if none were found and any lookup
        failed temporarily, DnsTempError is raised — "no address" must only be
        reported when both answers are definite.
        """
        results = await asyncio.gather(
            self.query(host, "A"), self.query(host, "AAAA"), return_exceptions=True
        )
        addresses: list[str] = []
        temp_error: DnsTempError | None = None
        for res in results:
            if isinstance(res, DnsTempError):
                temp_error = temp_error or res
            elif isinstance(res, BaseException):
                raise res
            elif res.rcode == "NOERROR":
                addresses.extend(res.records)
        if not addresses and temp_error is not None:
            raise temp_error
        return addresses

    async def resolve_mx(self, domain: str) -> MxResult:
        """Where to deliver mail for domain (RFC 5321 5.1, RFC 7505)."""
        answer = await self.query(domain, "MX")
        name = answer.name
        if answer.rcode == "NXDOMAIN":
            return MxResult(name, "nxdomain", ())
        if answer.rcode == "NODATA" or not answer.records:
            # No MX: the domain itself is the implicit MX, if it has an address.
            if await self.resolve_addresses(name):
                return MxResult(name, "ok", ((0, name),))
            return MxResult(name, "no_host", ())
        best: dict[str, int] = {}
        for pref, host in answer.records:
            # A "." exchange is the null MX; mixed with real MXes (forbidden by
            # RFC 7505 3) it is just an undeliverable host, so it is skipped.
            if host == ".":
                continue
            if host not in best or pref < best[host]:
                best[host] = pref
        if not best:
            return MxResult(name, "null_mx", ())
        by_pref: dict[int, list[str]] = collections.defaultdict(list)
        for host, pref in best.items():
            by_pref[pref].append(host)
        hosts: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            # RFC 5321 5.1: randomise among equal preferences to spread load.
            self._rng.shuffle(group)
            hosts.extend((pref, h) for h in group)
        return MxResult(name, "ok", tuple(hosts))

    def stats(self) -> dict:
        return {
            "hits": self._hits,
            "misses": self._misses,
            "joined": self._joined,
            "errors": self._errors,
            "entries": len(self._entries),
        }

    def clear(self) -> None:
        """Drop every cached answer (in-flight lookups are left to finish)."""
        self._entries.clear()

    # -- internals -----------------------------------------------------
    @staticmethod
    def _normalise(name: str, rdtype: str) -> tuple[dns.name.Name, int]:
        try:
            # from_text does IDNA (U-labels -> A-labels); canonicalize()
            # lower-cases, so "Example.COM." and "example.com" share an entry.
            qname = dns.name.from_text(name).canonicalize()
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            raise DnsError(f"invalid DNS name {name!r}: {e}") from e
        try:
            rdt = dns.rdatatype.from_text(rdtype.upper())
        except (dns.exception.DNSException, ValueError) as e:
            raise DnsError(f"unknown record type {rdtype!r}") from e
        if dns.rdatatype.is_metatype(rdt):
            raise DnsError(f"meta record type {rdtype!r} cannot be queried")
        return qname, rdt

    def _lookup(self, key: tuple[str, int]) -> DnsAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        remaining = entry.expires - self._clock()
        if remaining <= 0:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return dataclasses.replace(
            entry.answer,
            ttl=min(entry.answer.ttl, math.ceil(remaining)),
            from_cache=True,
        )

    def _store(self, key: tuple[str, int], answer: DnsAnswer) -> None:
        if answer.ttl <= 0:
            return  # TTL 0 means "do not cache" (RFC 1035 3.2.1)
        self._entries[key] = _Entry(answer, self._clock() + answer.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def _fetch_done(self, key: tuple[str, int], task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        # Mark the exception as retrieved: if every waiter was cancelled no
        # one else would, and asyncio would log "Task exception was never
        # retrieved".  Waiters still receive it through their shield().
        if not task.cancelled():
            task.exception()

    def _clamp(self, ttl: int) -> int:
        return max(self._min_ttl, min(int(ttl), self._max_ttl))

    def _negative_ttl_of(self, response: dns.message.Message | None) -> int:
        """RFC 2308 5: min(SOA TTL, SOA MINIMUM), also bounded by CNAME TTLs."""
        if response is None:
            return self._clamp(self._negative_ttl)
        ttl: int | None = None
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                ttl = min(rrset.ttl, rrset[0].minimum)
                break
        if ttl is None:
            ttl = self._negative_ttl
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.CNAME:
                ttl = min(ttl, rrset.ttl)
        return self._clamp(ttl)

    async def _fetch(self, qname: dns.name.Name, rdt: int, key) -> DnsAnswer:
        name_text, rdtype_text = key[0], dns.rdatatype.to_text(rdt)
        try:
            # lifetime bounds dnspython's retries, but it checks it only
            # between attempts (and may first sleep a backoff), so a hard
            # asyncio deadline makes `timeout` a real upper bound.
            async with asyncio.timeout(self._timeout):
                result = await self._resolver.resolve(
                    qname,
                    rdt,
                    raise_on_no_answer=False,  # NODATA is an answer, not an error
                    search=False,
                    lifetime=self._timeout,
                )
        except dns.resolver.NXDOMAIN as e:
            response = e.kwargs.get("responses", {}).get(qname)
            answer = DnsAnswer(name_text, rdtype_text, "NXDOMAIN", (),
                               self._negative_ttl_of(response), False)
        except dns.resolver.YXDOMAIN as e:
            # DNAME substitution overflowed: the name cannot exist as asked.
            self._errors += 1
            raise DnsError(f"{name_text}/{rdtype_text}: YXDOMAIN") from e
        except (dns.exception.Timeout, TimeoutError) as e:
            self._errors += 1
            log.debug("DNS timeout for %s/%s", name_text, rdtype_text)
            raise DnsTempError(f"{name_text}/{rdtype_text}: timed out") from e
        except (dns.exception.DNSException, OSError) as e:
            # NoNameservers (SERVFAIL/REFUSED everywhere), malformed replies,
            # CNAME loops, socket errors: no definite answer -> tempfail.
            self._errors += 1
            log.debug("DNS failure for %s/%s: %s", name_text, rdtype_text, e)
            raise DnsTempError(f"{name_text}/{rdtype_text}: {e}") from e
        else:
            if result.rrset is None:
                answer = DnsAnswer(name_text, rdtype_text, "NODATA", (),
                                   self._negative_ttl_of(result.response), False)
            else:
                records = tuple(_record_value(rdt, rd) for rd in result.rrset)
                ttl = self._clamp(result.chaining_result.minimum_ttl)
                answer = DnsAnswer(name_text, rdtype_text, "NOERROR", records, ttl, False)
        self._store(key, answer)
        return answer
