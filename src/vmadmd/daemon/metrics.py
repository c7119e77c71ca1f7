"""Prometheus metrics (prometheus-client), one registry per daemon.

Counters and histograms are updated where things happen; gauges that
describe the current state (VMs by state, open VNC sessions) are computed
at scrape time by a collector, so they can never drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class _StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, float]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self._snapshot()
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
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.api_requests = Counter(
            "vmadmd_api_requests", "API requests", ["route", "method", "status"], registry=r
        )
        self.api_latency = Histogram(
            "vmadmd_api_request_seconds", "API request latency", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.qmp_commands = Counter(
            "vmadmd_qmp_commands", "QMP commands", ["command", "outcome"], registry=r
        )
        self.qmp_latency = Histogram(
            "vmadmd_qmp_command_seconds", "QMP command latency", ["command"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.qmp_timeouts = Counter(
            "vmadmd_qmp_timeouts", "QMP commands that timed out", registry=r
        )
        self.vnc_bytes = Counter("vmadmd_vnc_bytes", "Bytes proxied for VNC clients", registry=r)
        self.vnc_clients = Counter(
            "vmadmd_vnc_clients",
            "VNC clients accepted, by how they were served: handed_off (to qemu), proxied, or "
            "unknown (a handoff cut short: qemu has the client, or it was closed), or refused "
            "(the listener's caps on sessions and hand-offs were reached)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.vnc_listener_errors = Counter(
            "vmadmd_vnc_listener_errors", "VNC listeners that could not open", registry=r
        )
        self.vm_exits = Counter(
            "vmadmd_vm_exits",
            "VM exits by reason (poweroff, stop, panic, crash) and, for a stop, the stage "
            "that ended it (acpi, quit, sigterm, sigkill)",
            ["reason", "stage"], registry=r,
        )  # fmt: skip
        self.crash_restarts = Counter(
            "vmadmd_crash_restarts",
            "restart_on_crash decisions: restarted, or given_up (too many crashes)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.api_in_flight = Gauge(
            "vmadmd_api_requests_in_flight", "API requests being served", registry=r
        )
        self.console_sessions = Gauge(
            "vmadmd_console_sessions", "Open browser console sessions", registry=r
        )
        self.autoboot_seconds = Gauge(
            "vmadmd_autoboot_seconds", "Duration of the last autoboot run", registry=r
        )

        # Label children, looked up once: ``labels()`` validates and locks on
        # every call, and these two pairs are counted on every request.
        self._api_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._qmp_series: dict[tuple[str, str], tuple[Any, Any]] = {}

    def api_request(self, route: str, method: str, status: int, took: float) -> None:
        key = (route, method, status)
        series = self._api_series.get(key)
        if series is None:
            series = self._api_series[key] = (
                self.api_requests.labels(route, method, str(status)),
                self.api_latency.labels(route),
            )
        series[0].inc()
        series[1].observe(took)

    def qmp_command(self, command: str, outcome: str, took: float) -> None:
        key = (command, outcome)
        series = self._qmp_series.get(key)
        if series is None:
            series = self._qmp_series[key] = (
                self.qmp_commands.labels(command, outcome),
                self.qmp_latency.labels(command),
            )
        series[0].inc()
        series[1].observe(took)
        if outcome == "timeout":
            self.qmp_timeouts.inc()

    def watch_state(self, snapshot: Callable[[], dict[str, float]]) -> None:
        self.registry.register(_StateCollector(snapshot))

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
