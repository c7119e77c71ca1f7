"""aiohttp, imported without loading the system's CA bundle.

aiohttp, when imported, builds two verified TLS client contexts, each loading
the system's CA bundle: ~30 ms on this machine kind, for contexts vmadmd never
uses (it opens no TLS connection).  Every module of the daemon takes aiohttp
from here: the first import points OpenSSL at no CA bundle for the moment of
the import and puts the environment back at once.  The import runs on the
event loop's thread, so no child process is started meanwhile with that
environment.
"""

from __future__ import annotations

import os


def _import_without_ca_bundle() -> None:
    names = ("SSL_CERT_FILE", "SSL_CERT_DIR")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = os.devnull
    try:
        import aiohttp  # noqa: F401
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_import_without_ca_bundle()

from aiohttp import WSCloseCode, WSMsgType, web  # noqa: E402
from aiohttp.http_exceptions import HttpProcessingError  # noqa: E402

__all__ = ["HttpProcessingError", "WSCloseCode", "WSMsgType", "web"]
