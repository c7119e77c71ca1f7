"""Prometheus metrics: counted here, written out by prometheus-client.

Counters and histograms are updated where things happen; gauges that
describe the current state (VMs by state, open VNC sessions) are computed
at scrape time by a collector, so they can never drift.

Why the values are not prometheus_client's own ``Counter``/``Histogram``:
importing prometheus_client costs ~27 ms (its exposition module pulls in
``http.server``, ``urllib.request`` and ``wsgiref``), a third of the
daemon's 77-87 ms from exec to its first answer (bench_api row 4, against
libvirtd's 43-56 ms measured on the same machine; ``python -X importtime
-c "import vmadmd.daemon.main"``). So the values live in plain objects
here: a float per labelled series, a list of bucket counts per histogram;
every update happens on the event loop's thread, so none needs a lock
(prometheus_client takes one per ``inc`` and ``observe``). The first
scrape imports prometheus_client, whose registry, metric families and
``generate_latest`` write the page: names, labels, ``_total`` suffixes,
``le`` buckets and escaping are the library's own.
``test_metrics_match_prometheus_client`` checks that the page parses to the
same samples as prometheus_client's own metrics fed the same updates
(``_created`` aside: not written here).
"""

from __future__ import annotations

import asyncio
import bisect
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Collector", "Counter", "Gauge", "Histogram", "Metrics"]

MAX_COMMAND_NAMES = 512  # distinct QMP command labels (qemu 7.2 lists 216 commands)
OTHER = "other"
_LIBRARY = "prometheus_client.core"  # imports the package, and what collectors use

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Collector(Protocol):
    """What prometheus_client's registry asks of a collector, and ``prepare``:
    called on the event loop before each scrape, so that ``collect`` may run
    in a thread without walking state the loop changes."""

    def prepare(self) -> None: ...

    def collect(self) -> Iterable[Any]: ...


class _Value:
    """One series of a counter or a gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _Buckets:
    """One series of a histogram: a count per bucket (not cumulative), and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound ("le") is >= value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


S = TypeVar("S", "_Value", "_Buckets")


class _Family(Generic[S]):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], S] = {}
        if not self.labelnames:
            self._solo: S = self.labels()

    def _new(self) -> S:
        raise NotImplementedError

    def labels(self, *values: str) -> S:
        """The series for these label values (made on first use)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values!r}")
        key = tuple(str(v) for v in values)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = self._new()
        return series


class Counter(_Family[_Value]):
    def _new(self) -> _Value:
        return _Value()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._solo.inc(amount)


class Gauge(_Family[_Value]):
    def _new(self) -> _Value:
        return _Value()

    def inc(self, amount: float = 1.0) -> None:
        self._solo.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._solo.dec(amount)

    def set(self, value: float) -> None:
        self._solo.set(value)


class Histogram(_Family[_Buckets]):
    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        bounds = sorted(float(b) for b in buckets if b != float("inf"))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct, at least one")
        self.bounds = tuple(bounds)
        super().__init__(name, doc, labelnames)

    def _new(self) -> _Buckets:
        return _Buckets(self.bounds)

    def observe(self, value: float) -> None:
        self._solo.observe(value)


class _Families:
    """Collector: this module's families as prometheus_client metric families.

    Safe in a thread while the loop counts: a family's series are listed in
    one C call (``list(dict.items())``, under the GIL); a value read mid-way
    through an update is one update early.
    """

    def __init__(self, families: Sequence[_Family[Any]]) -> None:
        self._families = families

    def prepare(self) -> None:
        pass

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        for fam in self._families:
            labels = list(fam.labelnames)
            if isinstance(fam, Histogram):
                hist = HistogramMetricFamily(fam.name, fam.doc, labels=labels)
                go: Callable[[float], str] = floatToGoString  # untyped upstream
                les = [go(b) for b in fam.bounds] + ["+Inf"]
                for key, b in list(fam.series.items()):
                    cumulative: list[tuple[str, float]] = []
                    total = 0
                    for le, n in zip(les, b.counts, strict=True):
                        total += n
                        cumulative.append((le, float(total)))
                    hist.add_metric(list(key), cumulative, b.sum)
                yield hist
            else:
                cls = CounterMetricFamily if isinstance(fam, Counter) else GaugeMetricFamily
                out = cls(fam.name, fam.doc, labels=labels)
                for key, v in list(fam.series.items()):
                    out.add_metric(list(key), v.value)
                yield out


class _StateCollector:
    def __init__(self, snapshot: Callable[[], dict[str, float]]) -> None:
        self._snapshot = snapshot
        self._values: dict[str, float] = {}

    def prepare(self) -> None:
        self._values = self._snapshot()  # on the loop: it walks the daemon's state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        values = self._values
        vms = GaugeMetricFamily("vmadmd_vms", "VMs by state", labels=["state"])
        for state in ("running", "stopping", "stopped", "broken"):
            vms.add_metric([state], values.get(f"vms_{state}", 0.0))
        yield vms
        yield GaugeMetricFamily(
            "vmadmd_vnc_sessions", "Open proxied VNC sessions", value=values.get("vnc_sessions", 0)
        )
        yield GaugeMetricFamily(
            "vmadmd_vnc_listeners", "Open VNC listeners", value=values.get("vnc_listeners", 0)
        )
        yield GaugeMetricFamily(
            "vmadmd_event_subscribers",
            "Clients following GET /events",
            value=values.get("event_subscribers", 0),
        )


class Metrics:
    """The daemon's metrics; ``render()`` writes the Prometheus text page."""

    def __init__(self) -> None:
        self.api_requests = Counter(
            "vmadmd_api_requests", "API requests", ["route", "method", "status"]
        )
        self.api_latency = Histogram("vmadmd_api_request_seconds", "API request latency", ["route"])
        self.qmp_commands = Counter("vmadmd_qmp_commands", "QMP commands", ["command", "outcome"])
        self.qmp_latency = Histogram(
            "vmadmd_qmp_command_seconds", "QMP command latency", ["command"]
        )
        self.qmp_timeouts = Counter("vmadmd_qmp_timeouts", "QMP commands that timed out")
        self.vnc_bytes = Counter("vmadmd_vnc_bytes", "Bytes proxied for VNC clients")
        self.vnc_clients = Counter(
            "vmadmd_vnc_clients",
            "VNC clients accepted, by how they were served: handed_off (to qemu), proxied, "
            "accepted_by_qemu (on the port qemu listens on), unknown (a handoff cut short: qemu "
            "has the client, or it was closed), or refused (the listener's caps on sessions and "
            "hand-offs were reached)",
            ["outcome"],
        )
        self.vnc_listener_errors = Counter(
            "vmadmd_vnc_listener_errors", "VNC listeners that could not open"
        )
        self.vm_exits = Counter(
            "vmadmd_vm_exits",
            "VM exits by reason (poweroff, stop, panic, crash) and, for a stop, the stage "
            "that ended it (acpi, quit, sigterm, sigkill)",
            ["reason", "stage"],
        )
        self.crash_restarts = Counter(
            "vmadmd_crash_restarts",
            "restart_on_crash decisions: restarted, or given_up (too many crashes)",
            ["outcome"],
        )
        self.api_in_flight = Gauge("vmadmd_api_requests_in_flight", "API requests being served")
        self.console_sessions = Gauge("vmadmd_console_sessions", "Open browser console sessions")
        self.autoboot_seconds = Gauge(
            "vmadmd_autoboot_seconds", "Duration of the last autoboot run"
        )
        own: list[_Family[Any]] = [v for v in vars(self).values() if isinstance(v, _Family)]
        self._collectors: list[Collector] = [_Families(own)]
        self._registry: Any = None
        # Label children, looked up once: these two pairs are counted on every request.
        self._api_series: dict[tuple[str, str, int], tuple[_Value, _Buckets]] = {}
        self._qmp_series: dict[tuple[str, str], tuple[_Value, _Buckets]] = {}
        self._qmp_names: set[str] = {OTHER}

    def api_request(self, route: str, method: str, status: int, took: float) -> None:
        key = (route, method, status)
        series = self._api_series.get(key)
        if series is None:
            series = self._api_series[key] = (
                self.api_requests.labels(route, method, str(status)),
                self.api_latency.labels(route),
            )
        series[0].value += 1
        series[1].observe(took)

    def qmp_command(self, command: str, outcome: str, took: float) -> None:
        key = (command, outcome)
        series = self._qmp_series.get(key)
        if series is None:
            # The pass-through sends any name a client gives: past a bound
            # the names are counted as "other", so no client can mint
            # series without end.
            if command not in self._qmp_names:
                if len(self._qmp_names) >= MAX_COMMAND_NAMES:
                    self.qmp_command(OTHER, outcome, took)
                    return
                self._qmp_names.add(command)
            series = self._qmp_series[key] = (
                self.qmp_commands.labels(command, outcome),
                self.qmp_latency.labels(command),
            )
        series[0].value += 1
        series[1].observe(took)
        if outcome == "timeout":
            self.qmp_timeouts.inc()

    def watch_state(self, snapshot: Callable[[], dict[str, float]]) -> None:
        """Gauges of the current state, computed at each scrape."""
        self.add_collector(_StateCollector(snapshot))

    def add_collector(self, collector: Collector) -> None:
        """Another source of metric families (prometheus_client's), read at each scrape."""
        self._collectors.append(collector)
        if self._registry is not None:
            self._registry.register(collector)

    async def load(self) -> None:
        """Import prometheus_client off the event loop, before the first render."""
        if _LIBRARY not in sys.modules:
            await asyncio.to_thread(importlib.import_module, _LIBRARY)

    async def page(self) -> tuple[bytes, str]:
        """``render``, its reads and formatting in a thread (the collectors
        prepared on the loop first): a scrape of 1,000 VMs does not hold the
        loop for its ~45 ms."""
        await self.load()
        prom = self._prepare()
        return await asyncio.to_thread(self._write, prom, self._registry)

    def render(self) -> tuple[bytes, str]:
        """The page and its content type, all on the caller's thread (the
        first call imports prometheus_client)."""
        prom = self._prepare()
        return self._write(prom, self._registry)

    def _prepare(self) -> Any:
        """The registry (made the first time), every collector prepared: on
        the caller's thread, the loop's for ``page``."""
        prom = importlib.import_module("prometheus_client")
        if self._registry is None:
            self._registry = prom.CollectorRegistry()
            for collector in self._collectors:
                self._registry.register(collector)
        for collector in self._collectors:
            collector.prepare()
        return prom

    @staticmethod
    def _write(prom: Any, registry: Any) -> tuple[bytes, str]:
        data: bytes = prom.generate_latest(registry)
        return data, str(prom.CONTENT_TYPE_LATEST)
