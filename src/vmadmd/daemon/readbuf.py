"""One read buffer per thread, lent to every ``BufferedProtocol`` of the daemon.

With a plain ``Protocol``, asyncio reads each chunk into a new 256 KiB bytes
object: glibc serves that with mmap, then mremap and munmap (strace of the
daemon under ``bench/bench_api.py``: three such calls per read, two reads per
API call).  A ``BufferedProtocol`` gives asyncio the buffer to ``recv_into``
instead.  One buffer serves every connection of the thread's event loop:
asyncio calls ``get_buffer``, reads, and calls ``buffer_updated`` in one go,
and the protocol copies the bytes out before it returns.
"""

from __future__ import annotations

import threading

SIZE = 64 * 1024

_local = threading.local()


def read_buffer() -> memoryview:
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(SIZE))
    return view
