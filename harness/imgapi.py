"""An IMGAPI-shaped image server on loopback, for tests and benches.

``GET /ping``, ``GET /images``, ``GET /images/:uuid`` and ``GET
/images/:uuid/file`` (sent with ``sendfile``), from images published into
it with ``publish``.  ``faults`` makes one route misbehave the ways a real
source does: garbage instead of HTTP, a hang, a trickle, wrong bytes.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.server
import json
import lzma
import shutil
import subprocess
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any


def make_disk(path: Path, size_mib: int, marker: bytes, fmt: str = "qcow2") -> None:
    """A disk image of ``size_mib`` holding ``marker`` at 1 MiB (for the guest to read)."""
    raw = path.with_suffix(".src.raw")
    with open(raw, "wb") as f:
        f.truncate(size_mib << 20)
        f.seek(1 << 20)
        f.write(marker)
    if fmt == "raw":
        raw.rename(path)
        return
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True)  # fmt: skip
    raw.unlink()


def pack(src: Path, dst: Path, compression: str) -> tuple[str, int]:
    """``src`` compressed into ``dst``; its sha1 and size."""
    if compression == "none":
        shutil.copyfile(src, dst)
    else:
        opener: Any = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}[compression]
        with open(src, "rb") as fin, opener(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    sha1 = hashlib.sha1()
    with open(dst, "rb") as f:
        while chunk := f.read(1 << 20):
            sha1.update(chunk)
    return sha1.hexdigest(), dst.stat().st_size


def manifest_for(
    uuid: str, name: str, sha1: str, size: int, compression: str, kind: str, **extra: Any
) -> dict[str, Any]:
    return {
        "v": 2, "uuid": uuid, "name": name, "version": "1.0.0", "type": kind, "os": "linux",
        "state": "active", "disabled": False, "public": True,
        "published_at": "2026-01-02T03:04:05.678Z",
        "files": [{"sha1": sha1, "size": size, "compression": compression}],
        **extra,
    }  # fmt: skip


class ImgapiServer:
    """The server; ``url`` is where it listens.  Use as a context manager."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.images: dict[str, tuple[dict[str, Any], Path]] = {}
        # route ("ping", "list", "manifest", "file") -> fault name
        self.faults: dict[str, str] = {}
        self.trickle_delay = 0.05
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if parts == ["ping"]:
                    self._route("ping", {"ping": "pong"})
                elif parts == ["images"]:
                    self._route("list", [m for m, _ in server.images.values()])
                elif len(parts) == 2 and parts[0] == "images" and parts[1] in server.images:
                    self._route("manifest", server.images[parts[1]][0])
                elif len(parts) == 3 and parts[0] == "images" and parts[1] in server.images:
                    self._file(server.images[parts[1]][1])
                else:
                    self._json(404, {"code": "ResourceNotFound", "message": "not found"})

            def _fault(self, route: str) -> bool:
                fault = server.faults.get(route)
                if fault == "garbage":
                    self.wfile.write(b"\x00\xffthis is not HTTP\r\n\r\n")
                    self.close_connection = True
                    return True
                if fault == "hang":
                    time.sleep(30)
                    self.close_connection = True
                    return True
                if fault == "notjson":
                    body = b"<html>hello</html>"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return True
                return False

            def _route(self, route: str, data: Any) -> None:
                if not self._fault(route):
                    self._json(200, data)

            def _json(self, status: int, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, path: Path) -> None:
                if self._fault("file"):
                    return
                size = path.stat().st_size
                fault = server.faults.get("file_bytes")
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                try:
                    with open(path, "rb") as f:
                        if fault == "trickle":
                            while chunk := f.read(64 << 10):
                                self.wfile.write(chunk)
                                self.wfile.flush()
                                time.sleep(server.trickle_delay)
                        elif fault == "truncate":  # closes halfway, Content-Length full
                            self.wfile.write(f.read(size // 2))
                            self.close_connection = True
                        elif fault == "flip":  # same size, one byte changed
                            data = bytearray(f.read())
                            data[len(data) // 2] ^= 0xFF
                            self.wfile.write(bytes(data))
                        else:
                            self.connection.sendfile(f)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImgapiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def publish(
        self,
        disk: Path,
        *,
        compression: str = "none",
        kind: str = "qcow2",
        name: str = "test-image",
        uuid: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Serve ``disk`` (compressed as asked) as a new image; its manifest."""
        uuid = uuid or str(uuidlib.uuid4())
        served = self.workdir / f"{uuid}.file"
        sha1, size = pack(disk, served, compression)
        manifest = manifest_for(uuid, name, sha1, size, compression, kind, **extra)
        self.images[uuid] = (manifest, served)
        return manifest

    def serve(self, manifest: dict[str, Any], file: Path) -> None:
        """Serve ``file`` as is under ``manifest`` (a lying manifest, say)."""
        self.images[manifest["uuid"]] = (manifest, file)
