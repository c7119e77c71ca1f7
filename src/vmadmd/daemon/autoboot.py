"""Autoboot: on the first daemon start after a host boot, boot flagged VMs.

The marker lives on tmpfs, so its absence means "first start since boot".
Unlike SmartOS (which writes the marker first, so a crash mid-way loses the
rest), the marker is written only once every boot has been tried: a daemon
killed half-way finishes the job on its next start, and since a VM already
running is skipped, none is booted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vmadmd.errors import VmadmError, WrongState

log = logging.getLogger("vmadmd.autoboot")


def plan(records: Iterable[dict[str, Any]], running: set[str]) -> list[list[str]]:
    """Groups of uuids to boot, in order: lower ``autoboot_order`` first.

    Only VMs with ``autoboot: true`` that are not running; VMs with no order
    come last; equal orders form one group (booted together).
    """
    groups: dict[tuple[int, int], list[str]] = {}
    for vm in records:
        if vm.get("autoboot") is not True or vm["uuid"] in running:
            continue
        order = vm.get("autoboot_order")
        key = (0, order) if isinstance(order, int) else (1, 0)
        groups.setdefault(key, []).append(vm["uuid"])
    return [sorted(groups[k]) for k in sorted(groups)]


@dataclass
class Progress:
    state: str = "idle"  # idle | skipped | running | done
    pending: int = 0
    done: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pending": self.pending,
            "done": self.done,
            "failed": self.failed,
            "failures": dict(self.failures),
            "seconds": self.seconds,
        }


async def run(
    marker: str,
    records: list[dict[str, Any]],
    running: set[str],
    boot: Callable[[str], Awaitable[float]],
    *,
    concurrency: int,
    group_delay: float,
    progress: Progress,
) -> None:
    if await asyncio.to_thread(os.path.exists, marker):
        progress.state = "skipped"
        log.info("autoboot marker %s exists: not the first start since boot", marker)
        return
    groups = plan(records, running)
    progress.state = "running"
    progress.pending = sum(len(g) for g in groups)
    t0 = time.monotonic()
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(uuid: str) -> None:
        async with sem:
            try:
                took = await boot(uuid)
            except WrongState:
                took = 0.0  # already running (a previous, interrupted autoboot)
            except VmadmError as err:
                progress.failed += 1
                progress.failures[uuid] = err.message
                log.error("autoboot of VM %s failed: %s", uuid, err.message, extra={"vm": uuid})
                return
            except Exception as err:  # a bug, but one VM's: the others still boot
                progress.failed += 1
                progress.failures[uuid] = f"internal error: {type(err).__name__}"
                log.exception("autoboot of VM %s failed", uuid, extra={"vm": uuid})
                return
            finally:
                progress.pending -= 1
            progress.done += 1
            log.info("autoboot: VM %s booted in %.3f s", uuid, took, extra={"vm": uuid})

    for i, group in enumerate(groups):
        await asyncio.gather(*(one(u) for u in group))
        if group_delay > 0 and i + 1 < len(groups):
            await asyncio.sleep(group_delay)
    # Only now: a daemon killed before this line redoes the (idempotent) job.
    with contextlib.suppress(FileExistsError):
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.close(fd)
    progress.seconds = round(time.monotonic() - t0, 3)
    progress.state = "done"
    log.info(
        "autoboot done: %d booted, %d failed in %.3f s",
        progress.done, progress.failed, progress.seconds,
    )  # fmt: skip
