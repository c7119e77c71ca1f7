"""The daemon's metric values against prometheus_client's own, fed the same updates."""

from __future__ import annotations

import asyncio
from typing import Any

import prometheus_client
import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from vmadmd.daemon import metrics as ours

# Latencies on, between, below and above the buckets' bounds.
OBSERVED = [0.0, 0.0004, 0.0005, 0.0007, 0.001, 0.003, 0.099, 0.1, 0.5, 2.0, 10.0, 11.5, 1e6]
ODD = 'a "quoted" back\\slash\nnewline, ünïcode'


def samples(page: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but ``_created`` (prometheus_client's own metrics write them, ours do not)."""
    out = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def feed(counter: Any, labelled: Any, gauge: Any, hist: Any, solo_hist: Any) -> None:
    counter.inc()
    counter.inc(2.5)
    for route, status in [("info", "200"), ("info", "200"), ("stop", "409"), (ODD, "500")]:
        labelled.labels(route, status).inc()
    gauge.inc(3)
    gauge.dec()
    gauge.set(7.25)
    for i, v in enumerate(OBSERVED):
        hist.labels("even" if i % 2 == 0 else "odd").observe(v)
        solo_hist.observe(v)


def test_metrics_match_prometheus_client() -> None:
    reg = prometheus_client.CollectorRegistry()
    feed(
        prometheus_client.Counter("t_plain", "plain counter", registry=reg),
        prometheus_client.Counter("t_req", "labelled", ["route", "status"], registry=reg),
        prometheus_client.Gauge("t_gauge", "a gauge", registry=reg),
        prometheus_client.Histogram(
            "t_hist", "by kind", ["kind"], buckets=ours.LATENCY_BUCKETS, registry=reg
        ),
        prometheus_client.Histogram(
            "t_solo", "no labels", buckets=ours.LATENCY_BUCKETS, registry=reg
        ),
    )
    theirs = samples(prometheus_client.generate_latest(reg).decode())

    m = ours.Metrics()
    own: list[ours._Family[Any]] = [
        ours.Counter("t_plain", "plain counter"),
        ours.Counter("t_req", "labelled", ["route", "status"]),
        ours.Gauge("t_gauge", "a gauge"),
        ours.Histogram("t_hist", "by kind", ["kind"]),
        ours.Histogram("t_solo", "no labels"),
    ]
    feed(*own)
    m._collectors = [ours._Families(own)]
    page, content_type = m.render()
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    mine = samples(page.decode())
    assert mine == theirs
    # Not vacuous: the odd label value came through, buckets are cumulative.
    assert mine[("t_req_total", (("route", ODD), ("status", "500")))] == 1.0
    assert mine[("t_solo_bucket", (("le", "0.0005"),))] == 3.0
    assert mine[("t_solo_bucket", (("le", "+Inf"),))] == len(OBSERVED)
    assert mine[("t_solo_count", ())] == len(OBSERVED)


def test_daemon_metrics_render_and_collectors_join_after_the_first_scrape() -> None:
    m = ours.Metrics()
    m.api_request("info", "GET", 200, 0.0003)
    m.api_request("info", "GET", 200, 0.002)
    m.qmp_command("query-version", "timeout", 5.0)
    m.vnc_clients.labels("accepted_by_qemu").inc()
    m.watch_state(lambda: {"vms_running": 2.0, "vnc_listeners": 1.0})
    asyncio.run(m.load())
    first = samples(m.render()[0].decode())
    assert first[("vmadmd_api_requests_total", (("method", "GET"), ("route", "info"),
                                                ("status", "200")))] == 2.0  # fmt: skip
    assert first[("vmadmd_api_request_seconds_count", (("route", "info"),))] == 2.0
    assert first[("vmadmd_api_request_seconds_bucket", (("le", "0.001"), ("route", "info")))] == 1
    assert first[("vmadmd_qmp_timeouts_total", ())] == 1.0
    assert first[("vmadmd_vnc_clients_total", (("outcome", "accepted_by_qemu"),))] == 1.0
    assert first[("vmadmd_vms", (("state", "running"),))] == 2.0
    assert first[("vmadmd_api_requests_in_flight", ())] == 0.0

    class Late:
        def prepare(self) -> None:
            pass

        def collect(self) -> Any:
            yield GaugeMetricFamily("t_late", "joined after the first scrape", value=4)

    m.add_collector(Late())
    m.api_request("info", "GET", 200, 0.0003)
    again = samples(m.render()[0].decode())
    assert again[("t_late", ())] == 4.0
    assert again[("vmadmd_api_request_seconds_count", (("route", "info"),))] == 3.0


def test_misuse_is_refused() -> None:
    c = ours.Counter("t_c", "c", ["a"])
    with pytest.raises(ValueError, match="labels"):
        c.labels("x", "y")
    with pytest.raises(ValueError, match="only goes up"):
        ours.Counter("t_d", "d").inc(-1)
    with pytest.raises(ValueError, match="distinct"):
        ours.Histogram("t_h", "h", buckets=[1.0, 1.0])


def test_qmp_command_names_are_bounded() -> None:
    """The pass-through takes any command name: past a bound they count as "other"."""
    m = ours.Metrics()
    for i in range(ours.MAX_COMMAND_NAMES + 300):
        m.qmp_command(f"bogus-{i}", "error", 0.001)
    m.qmp_command("query-version", "ok", 0.001)  # a new name past the bound: "other" too
    names = {key[0] for key in m.qmp_commands.series}
    assert len(names) == ours.MAX_COMMAND_NAMES  # "other" is one of them
    assert m.qmp_commands.labels("other", "error").value == 301
    assert m.qmp_commands.labels("other", "ok").value == 1
    assert m.qmp_commands.labels("bogus-0", "error").value == 1


def test_a_scrape_prepares_on_the_loop_and_writes_in_a_thread() -> None:
    """``page()``: collectors copy the daemon's state on the loop's thread,
    then the reads and formatting run in another (the loop keeps serving)."""
    import threading

    seen: dict[str, int] = {}

    class Probe:
        def prepare(self) -> None:
            seen["prepare"] = threading.get_ident()

        def collect(self) -> Any:
            seen["collect"] = threading.get_ident()
            yield GaugeMetricFamily("t_probe", "where it ran", value=1)

    async def scrape() -> bytes:
        seen["loop"] = threading.get_ident()
        m = ours.Metrics()
        m.add_collector(Probe())
        m.watch_state(lambda: {"vms_running": 3.0})
        page, _ = await m.page()
        return page

    got = samples(asyncio.run(scrape()).decode())
    assert got[("t_probe", ())] == 1.0
    assert got[("vmadmd_vms", (("state", "running"),))] == 3.0
    assert seen["prepare"] == seen["loop"]
    assert seen["collect"] != seen["loop"]
