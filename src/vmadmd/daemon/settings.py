"""The daemon's settings, and what every supervisor is given by the manager."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from vmadmd.daemon.events import EventBus
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.migration import MigrationSettings
from vmadmd.vm import cgroup
from vmadmd.vm.config import VmSettings
from vmadmd.vm.store import Store


@dataclass
class CrashRestart:
    """restart_on_crash's back-off: ``delay`` doubling per crash up to
    ``max_delay``; more than ``limit`` crashes within ``window`` s: no more."""

    delay: float = 1.0
    max_delay: float = 60.0
    limit: int = 5
    window: float = 600.0


@dataclass
class DaemonSettings:
    vm: VmSettings
    vnc_bind: str = "127.0.0.1"
    qmp_timeout: float = 5.0
    # "listen": qemu accepts on the console's listening socket itself (the
    # daemon gives it over QMP; "handoff" where it cannot take it);
    # "handoff": give each console client to qemu's VNC server over QMP,
    # relaying only when qemu cannot take one; "proxy": always relay.
    vnc_relay: str = "listen"
    crash_restart: CrashRestart = field(default_factory=CrashRestart)
    migration: MigrationSettings = field(default_factory=MigrationSettings)


@dataclass
class Shared:
    """What every supervisor is given by the manager."""

    settings: DaemonSettings
    store: Store
    bus: EventBus
    metrics: Metrics
    connect_slots: asyncio.Semaphore
    spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]
    cgroups: cgroup.Cgroups
