"""Image sources: the imgadm conf and the IMGAPI servers it names.

The conf is SmartOS-shaped JSON, ``{"sources": [{"url": ..., "type":
"imgapi"}]}``, at ``--imgadm-conf`` / ``$VMADM_IMGADM_CONF`` (default
``<images_dir>/imgadm.conf``), written atomically under a lock.  No conf
means no sources: this host reaches no image server it was not told about
(``imgadm sources -a https://images.smartos.org -t imgapi`` adds SmartOS's).

An IMGAPI is three reads: ``GET /images`` (the manifests), ``GET
/images/:uuid`` (one manifest) and ``GET /images/:uuid/file`` (its file).
Every request has a connect and read timeout (``$VMADM_IMGADM_TIMEOUT``,
30 s by default); a JSON answer is also bounded in size and in total time,
so a server that answers garbage, trickles or hangs is one clear error.

Standard library only; ``urllib`` is imported only by the commands that
talk to a source.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time

from vmadmd.errors import InvalidParameter
from vmadmd.vm.images import InvalidManifest, SourceError, check_manifest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from http.client import HTTPResponse
    from typing import Any

    from vmadmd.vm.images import Manifest

DEFAULT_TIMEOUT = 30.0
LIST_LIMIT = 64 << 20
MANIFEST_LIMIT = 1 << 20
SOURCE_TYPES = ("imgapi",)


def conf_path(images_dir: str) -> str:
    return os.environ.get("VMADM_IMGADM_CONF", "") or os.path.join(images_dir, "imgadm.conf")


def timeout() -> float:
    raw = os.environ.get("VMADM_IMGADM_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise InvalidParameter(f"VMADM_IMGADM_TIMEOUT must be seconds in (0, 3600], not {raw!r}")
    return value


def same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


class Conf:
    """The imgadm conf file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MANIFEST_LIMIT + 1)
        except FileNotFoundError:
            return {"sources": []}
        except OSError as err:
            raise InvalidParameter(f"cannot read {self.path}: {err.strerror}") from None
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise InvalidParameter(f"{self.path} is not JSON: {err}") from None
        sources = data.get("sources", []) if isinstance(data, dict) else None
        if not isinstance(sources, list) or not all(
            isinstance(s, dict) and isinstance(s.get("url"), str) for s in sources
        ):
            raise InvalidParameter(
                f'{self.path}: expected {{"sources": [{{"url": ..., "type": "imgapi"}}]}}'
            )
        assert isinstance(data, dict)
        return data

    def sources(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.load()["sources"]
        return found

    @contextlib.contextmanager
    def editing(self) -> Iterator[dict[str, Any]]:
        """The conf, loaded under a lock and saved atomically when the block ends."""
        from vmadmd.vm.store import atomic_write_json

        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd = os.open(
            os.path.join(directory, "." + os.path.basename(self.path) + ".lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self.load()
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                atomic_write_json(self.path, data)
        finally:
            os.close(fd)


def check_url(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidParameter(f'image source "{url}" is not an http:// or https:// URL')
    return url


# -- HTTP ------------------------------------------------------------------------------


def _open(url: str, what: str) -> HTTPResponse | None:
    """The response to ``GET url`` (None for a 404); errors say which source failed."""
    import http.client
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "imgadm (vmadmd)"}
    )
    try:
        response: HTTPResponse = urllib.request.urlopen(request, timeout=timeout())
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 404:
            return None
        raise SourceError(f"{what}: {url} answered HTTP {err.code}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        text = "timed out" if isinstance(reason, TimeoutError) else str(reason)
        raise SourceError(f"{what}: {url}: {text}") from None
    except TimeoutError:
        raise SourceError(f"{what}: {url}: timed out after {timeout():g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise SourceError(f"{what}: {url} answered garbage ({type(err).__name__})") from None
    return response


def _read_json(url: str, what: str, limit: int) -> Any | None:
    """``GET url`` as JSON, bounded in size and total time; None for a 404."""
    import http.client

    response = _open(url, what)
    if response is None:
        return None
    deadline = time.monotonic() + 2 * timeout()
    body = bytearray()
    try:
        with response:
            while True:
                if time.monotonic() > deadline:
                    raise SourceError(f"{what}: {url} is too slow (trickling)")
                piece = response.read1(65536)
                if not piece:
                    break
                body += piece
                if len(body) > limit:
                    raise SourceError(f"{what}: {url} answered more than {limit} bytes")
    except TimeoutError:
        raise SourceError(f"{what}: {url}: timed out after {timeout():g} s") from None
    except (OSError, http.client.HTTPException) as err:
        raise SourceError(f"{what}: {url}: {type(err).__name__}: {err}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise SourceError(f"{what}: {url} answered garbage (not JSON)") from None


def ping(url: str) -> None:
    """SmartOS's check before a source is added: ``GET /ping`` answers JSON."""
    data = _read_json(url.rstrip("/") + "/ping", "image source", 65536)
    if not isinstance(data, dict):
        raise SourceError(
            f'"{url}" does not look like an IMGAPI (GET /ping): use -f to add it anyway'
        )


def list_images(url: str) -> list[Manifest]:
    """The manifests a source offers (the ones this host could install)."""
    data = _read_json(url.rstrip("/") + "/images", "image source", LIST_LIMIT)
    if not isinstance(data, list):
        raise SourceError(f"image source: {url}/images answered something else than a list")
    out = []
    for item in data:
        try:
            out.append(check_manifest(item))
        except InvalidManifest:
            continue  # a zone dataset, a docker layer: not for this host
    return out


def get_manifest(url: str, uuid: str) -> Manifest | None:
    """One image's manifest from a source (None when it does not have it)."""
    data = _read_json(f"{url.rstrip('/')}/images/{uuid}", "image source", MANIFEST_LIMIT)
    if data is None:
        return None
    manifest = check_manifest(data, f"manifest from {url}")
    if manifest["uuid"] != uuid:
        raise SourceError(f"image source {url} answered image {manifest['uuid']} for {uuid}")
    return manifest


class FileBody:
    """An image file's response body, read into the caller's buffer; whatever
    the connection does (a timeout, a reset, an early close under a
    Content-Length) is one SourceError naming the source."""

    def __init__(self, response: HTTPResponse, url: str) -> None:
        self.response = response
        self.url = url

    def readinto(self, buffer: bytearray | memoryview) -> int:
        import http.client

        try:
            return self.response.readinto(buffer)
        except TimeoutError:
            raise SourceError(
                f"image source {self.url}: the file stopped coming (timed out)"
            ) from None
        except http.client.IncompleteRead:
            raise SourceError(
                f"image source {self.url}: the connection closed before the whole file came"
            ) from None
        except (OSError, http.client.HTTPException) as err:
            raise SourceError(f"image source {self.url}: {type(err).__name__}: {err}") from None

    def __enter__(self) -> FileBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.response.close()


def open_file(url: str, uuid: str) -> FileBody:
    response = _open(f"{url.rstrip('/')}/images/{uuid}/file", "image source")
    if response is None:
        raise SourceError(f"image source {url} has the manifest of {uuid} but not its file")
    return FileBody(response, url)
