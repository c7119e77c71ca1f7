"""The soak, shortened, as a test: 90 s of traffic and chaos, zero errors.

``bench.soak`` with 8 real qemu and 300 stand-ins: 32 clients of mixed
requests while the chaos loop stops VMs (forced at 1 s) and starts them at
once, SIGKILLs qemus, races `vmadm stop -F` against a graceful stop, starts
a stopped VM from 4 clients at once and SIGKILLs and restarts the daemon.
Every forced stop must land within 1 s of its deadline.
"""

from __future__ import annotations

import pytest

from bench.soak import LATE_LIMIT, soak


@pytest.mark.timeout(400)
def test_soak_with_chaos_has_no_errors() -> None:
    report = soak(90, 300)
    print("\n".join(report.lines()))
    assert dict(report.errors) == {}, "\n".join(report.lines())
    assert report.served > 1000
    # Every kind of chaos ran, and forced stops were timed.
    assert len(report.chaos) == 5, dict(report.chaos)
    assert report.lateness
    assert max(report.lateness) <= LATE_LIMIT
