"""vmadmd, the daemon.

aiohttp, when imported, builds two verified TLS client contexts, each loading
the system's CA bundle: ~30 ms of the daemon's start-up on this machine kind
(``python -c "import vmadmd.daemon.main"``: 226 ms, 195 ms without), for
contexts vmadmd never uses (it opens no TLS connection).  So aiohttp is
imported here first, with OpenSSL pointed at no CA bundle for the moment of
the import, and the environment put back at once.
"""

from __future__ import annotations

import os


def _import_aiohttp_without_ca_bundle() -> None:
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


_import_aiohttp_without_ca_bundle()
