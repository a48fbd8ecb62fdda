"""Tests for mailbox_guard.dns against a real loopback DNS server."""

from __future__ import annotations

import asyncio
import gc
import time

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from mailbox_guard.lookups.dns import DnsAnswer, DnsCache, DnsError, DnsTempError, MxResult
from tests.dns_server import ZoneServer

ZONE = """
$ORIGIN example.com.
$TTL 300
@           IN SOA ns1 hostmaster 1 3600 600 86400 60
@           MX  20 mx-c
@           MX  10 mx-a
@           MX  10 mx-b
@           MX  30 mx-d
@           TXT "v=spf1 ip4:192.0.2.0/24 " "-all"
mx-a        A     192.0.2.1
mx-a        AAAA  2001:db8::1
mx-b        A     192.0.2.2
mx-c        A     192.0.2.3
mx-d        A     192.0.2.4
implicit    A     192.0.2.10
v6only      AAAA  2001:db8::10
null        MX  0 .
txtonly     TXT "hello"
short   60  A     192.0.2.20
long 999999 A     192.0.2.21
deep.ent    A     192.0.2.30
xn--bcher-kva A   192.0.2.40
4.2.0.192.in-addr.arpa. PTR mx-d
"""

NO_SOA_ZONE = """
only.test. 300 A 198.51.100.1
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(coro):
    """asyncio.run, but fail on anything the loop's exception handler sees
    (e.g. "Task exception was never retrieved")."""
    seen: list[dict] = []
    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(lambda loop, ctx: seen.append(ctx))
        result = runner.run(coro)
        gc.collect()  # make abandoned tasks report now, while we listen
    assert seen == [], seen
    return result


@pytest.fixture
def server():
    with ZoneServer(ZONE) as srv:
        yield srv


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cache(server, clock):
    return DnsCache([server.address], timeout=0.5, clock=clock)


# -- answers -------------------------------------------------------------

def test_a_aaaa_txt_ptr_answers(cache):
    async def main():
        return (
            await cache.query("MX-A.Example.COM.", "a"),
            await cache.query("mx-a.example.com", "AAAA"),
            await cache.query("example.com", "TXT"),
            await cache.query("4.2.0.192.in-addr.arpa", "PTR"),
        )

    a, aaaa, txt, ptr = run(main())
    assert a == DnsAnswer("mx-a.example.com", "A", "NOERROR", ("192.0.2.1",), 300, False)
    assert aaaa.records == ("2001:db8::1",)
    assert aaaa.rdtype == "AAAA"
    # character-strings are joined without separator (RFC 7208 3.3)
    assert txt.records == ("v=spf1 ip4:192.0.2.0/24 -all",)
    assert ptr.records == ("mx-d.example.com",)


def test_idna_name_is_normalised(cache):
    answer = run(cache.query("Bücher.example.com", "A"))
    assert answer.name == "xn--bcher-kva.example.com"
    assert answer.records == ("192.0.2.40",)


def test_invalid_name_is_permanent_error_not_temp(cache, server):
    with pytest.raises(DnsError) as info:
        run(cache.query("a" * 64 + ".example.com", "A"))
    assert not isinstance(info.value, DnsTempError)
    assert server.query_count == 0


def test_mx_sorted_ascending_random_within_preference(cache, server):
    async def main():
        return [await cache.resolve_mx("example.com") for _ in range(64)]

    results = run(main())
    orders = set()
    for res in results:
        assert res.status == "ok"
        assert res.domain == "example.com"
        assert [p for p, _ in res.hosts] == [10, 10, 20, 30]
        assert set(res.hosts[:2]) == {(10, "mx-a.example.com"), (10, "mx-b.example.com")}
        assert res.hosts[2:] == ((20, "mx-c.example.com"), (30, "mx-d.example.com"))
        orders.add(res.hosts[:2])
    # Both orders of the two preference-10 hosts show up (P(fail) = 2**-63).
    assert len(orders) == 2
    assert server.queries_for("example.com", "MX") == 1  # rest from cache


def test_implicit_mx_when_only_addresses(cache):
    async def main():
        return (await cache.resolve_mx("implicit.example.com"),
                await cache.resolve_mx("v6only.example.com"))

    v4, v6 = run(main())
    assert v4 == MxResult("implicit.example.com", "ok", ((0, "implicit.example.com"),))
    assert v6 == MxResult("v6only.example.com", "ok", ((0, "v6only.example.com"),))


def test_null_mx(cache):
    res = run(cache.resolve_mx("null.example.com"))
    assert res == MxResult("null.example.com", "null_mx", ())


def test_mx_nxdomain_and_no_host(cache):
    async def main():
        return (await cache.resolve_mx("missing.example.com"),
                await cache.resolve_mx("txtonly.example.com"))

    missing, txtonly = run(main())
    assert missing == MxResult("missing.example.com", "nxdomain", ())
    assert txtonly == MxResult("txtonly.example.com", "no_host", ())


def test_resolve_addresses(cache):
    async def main():
        return (await cache.resolve_addresses("mx-a.example.com"),
                await cache.resolve_addresses("txtonly.example.com"),
                await cache.resolve_addresses("missing.example.com"))

    both, none, missing = run(main())
    assert both == ["192.0.2.1", "2001:db8::1"]  # A first, then AAAA
    assert none == [] and missing == []


def test_nxdomain_vs_nodata(cache):
    async def main():
        return (await cache.query("missing.example.com", "A"),
                await cache.query("txtonly.example.com", "A"),
                await cache.query("ent.example.com", "A"))  # empty non-terminal

    nx, nodata, ent = run(main())
    assert nx.rcode == "NXDOMAIN" and nx.records == ()
    assert nodata.rcode == "NODATA" and nodata.records == ()
    assert ent.rcode == "NODATA"


# -- caching -------------------------------------------------------------

def test_cache_hit_avoids_second_query(cache, server):
    async def main():
        return (await cache.query("mx-a.example.com", "A"),
                await cache.query("MX-A.example.com.", "A"))

    first, second = run(main())
    assert first.from_cache is False
    assert second.from_cache is True
    assert second.records == first.records
    assert server.queries_for("mx-a.example.com", "A") == 1
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["entries"] == 1


def test_cache_survives_event_loops(cache, server):
    run(cache.query("mx-a.example.com", "A"))
    assert run(cache.query("mx-a.example.com", "A")).from_cache is True
    assert server.queries_for("mx-a.example.com", "A") == 1


def test_ttl_expiry_requeries(cache, server, clock):
    first = run(cache.query("short.example.com", "A"))
    assert first.ttl == 60
    server.set_zone(ZONE.replace("192.0.2.20", "192.0.2.99"))

    clock.advance(59.5)
    hit = run(cache.query("short.example.com", "A"))
    assert hit.from_cache and hit.ttl == 1 and hit.records == ("192.0.2.20",)

    clock.advance(1)
    fresh = run(cache.query("short.example.com", "A"))
    assert not fresh.from_cache
    assert fresh.records == ("192.0.2.99",)
    assert server.queries_for("short.example.com", "A") == 2


def test_ttl_clamped_to_max_and_min(server, clock):
    cache = DnsCache([server.address], timeout=0.5, clock=clock, min_ttl=120, max_ttl=3600)

    async def main():
        return (await cache.query("long.example.com", "A"),
                await cache.query("short.example.com", "A"))

    long, short = run(main())
    assert long.ttl == 3600
    assert short.ttl == 120
    clock.advance(100)  # beyond the record's own 60 s, within min_ttl
    assert run(cache.query("short.example.com", "A")).from_cache


def test_negative_cache_uses_soa_minimum(cache, server, clock):
    # SOA TTL 300, MINIMUM 60 -> negative TTL min(300, 60) = 60 (RFC 2308)
    nx = run(cache.query("missing.example.com", "A"))
    nodata = run(cache.query("txtonly.example.com", "A"))
    assert nx.ttl == 60 and nodata.ttl == 60

    clock.advance(59)
    assert run(cache.query("missing.example.com", "A")).from_cache
    assert run(cache.query("txtonly.example.com", "A")).from_cache
    assert server.query_count == 2

    clock.advance(2)
    again = run(cache.query("missing.example.com", "A"))
    assert not again.from_cache and again.rcode == "NXDOMAIN"
    assert server.queries_for("missing.example.com", "A") == 2


def test_negative_ttl_default_without_soa(clock):
    with ZoneServer(NO_SOA_ZONE) as srv:
        cache = DnsCache([srv.address], timeout=0.5, clock=clock, negative_ttl=7)
        nx = run(cache.query("nothere.test", "A"))
        assert nx.rcode == "NXDOMAIN" and nx.ttl == 7
        clock.advance(8)
        run(cache.query("nothere.test", "A"))
        assert srv.queries_for("nothere.test", "A") == 2


def test_lru_eviction(server, clock):
    cache = DnsCache([server.address], timeout=0.5, clock=clock, max_entries=2)

    async def main():
        await cache.query("mx-a.example.com", "A")
        await cache.query("mx-b.example.com", "A")
        await cache.query("mx-a.example.com", "A")  # a is now most recent
        await cache.query("mx-c.example.com", "A")  # evicts b
        return (await cache.query("mx-a.example.com", "A"),
                await cache.query("mx-b.example.com", "A"))

    a, b = run(main())
    assert a.from_cache and not b.from_cache
    assert cache.stats()["entries"] == 2
    assert server.queries_for("mx-b.example.com", "A") == 2


def test_clear(cache, server):
    run(cache.query("mx-a.example.com", "A"))
    cache.clear()
    assert cache.stats()["entries"] == 0
    assert not run(cache.query("mx-a.example.com", "A")).from_cache
    assert server.queries_for("mx-a.example.com", "A") == 2


def test_concurrent_identical_queries_single_flight(cache, server):
    async def main():
        return await asyncio.gather(*(cache.query("mx-c.example.com", "A") for _ in range(10)))

    answers = run(main())
    assert all(a.records == ("192.0.2.3",) for a in answers)
    assert server.queries_for("mx-c.example.com", "A") == 1
    stats = cache.stats()
    assert stats["joined"] == 9 and stats["misses"] == 1


def test_concurrent_errors_reach_every_waiter(cache, server):
    server.fail_mode = "servfail"

    async def main():
        return await asyncio.gather(
            *(cache.query("mx-c.example.com", "A") for _ in range(5)), return_exceptions=True
        )

    results = run(main())
    assert all(isinstance(r, DnsTempError) for r in results)
    assert server.queries_for("mx-c.example.com", "A") == 1
    assert cache.stats()["joined"] == 4


def test_cancelled_waiter_does_not_cancel_shared_lookup(cache, server):
    async def main():
        first = asyncio.ensure_future(cache.query("mx-d.example.com", "A"))
        second = asyncio.ensure_future(cache.query("mx-d.example.com", "A"))
        await asyncio.sleep(0)
        first.cancel()
        answer = await second
        with pytest.raises(asyncio.CancelledError):
            await first
        return answer

    answer = run(main())
    assert answer.records == ("192.0.2.4",)
    assert server.queries_for("mx-d.example.com", "A") == 1


# -- failures ------------------------------------------------------------

def test_servfail_raises_temp_error(cache, server):
    server.fail_mode = "servfail"
    start = time.monotonic()
    with pytest.raises(DnsTempError):
        run(cache.query("mx-a.example.com", "A"))
    with pytest.raises(DnsTempError):
        run(cache.resolve_mx("example.com"))
    assert time.monotonic() - start < 1.0


def test_dropped_query_times_out_within_deadline(cache, server):
    server.fail_mode = "drop"
    start = time.monotonic()
    with pytest.raises(DnsTempError):
        run(cache.query("mx-a.example.com", "A"))
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 0.9
    assert server.queries_for("mx-a.example.com", "A") >= 1
    assert cache.stats()["errors"] == 1


def test_implicit_mx_tempfails_rather_than_no_host(cache, server):
    async def main():
        await cache.query("implicit.example.com", "MX")  # cached NODATA
        server.fail_mode = "servfail"
        return await cache.resolve_mx("implicit.example.com")

    with pytest.raises(DnsTempError):
        run(main())


def test_temp_errors_are_not_cached(cache, server):
    server.fail_mode = "servfail"
    with pytest.raises(DnsTempError):
        run(cache.query("mx-a.example.com", "A"))
    assert cache.stats()["entries"] == 0

    server.fail_mode = None
    answer = run(cache.query("mx-a.example.com", "A"))
    assert answer.records == ("192.0.2.1",) and not answer.from_cache
    assert server.queries_for("mx-a.example.com", "A") == 2


# -- transport -----------------------------------------------------------

def test_server_answers_over_tcp(server):
    async def main():
        q = dns.message.make_query("mx-b.example.com", "A")
        return await dns.asyncquery.tcp(q, "127.0.0.1", port=server.port, timeout=2)

    response = run(main())
    assert response.rcode() == dns.rcode.NOERROR
    assert [rd.address for rd in response.answer[0]] == ["192.0.2.2"]
    assert server.tcp_query_count == 1


def test_truncated_udp_reply_retried_over_tcp(cache, server):
    server.truncate_udp = True
    answer = run(cache.query("mx-b.example.com", "A"))
    assert answer.records == ("192.0.2.2",)
    assert server.tcp_query_count == 1
    assert server.queries_for("mx-b.example.com", "A") == 2  # UDP (TC) + TCP


def test_failed_lookup_with_no_waiters_left_is_not_reported(cache, server):
    server.fail_mode = "servfail"

    async def main():
        waiter = asyncio.ensure_future(cache.query("mx-a.example.com", "A"))
        await asyncio.sleep(0)  # the shared lookup task now exists
        waiter.cancel()
        await asyncio.sleep(0.2)  # let the lookup fail with nobody awaiting it
        return waiter.cancelled()

    # run() fails if asyncio reports "Task exception was never retrieved".
    assert run(main()) is True
    assert server.queries_for("mx-a.example.com", "A") == 1
    assert cache.stats()["errors"] == 1


def test_server_threads_are_stopped():
    import threading

    before = set(threading.enumerate())
    with ZoneServer(NO_SOA_ZONE) as srv:
        port = srv.port
        assert port > 0
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []
