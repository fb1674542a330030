"""The upstream HTTP client: one aiohttp session for the whole process.

aiohttp rather than httpx on this hop because it is measured to be several times
cheaper per request (see docs/design.md and ``bench/``). Its session is
set up as a proxy needs it:

* no cookie jar: a cookie from one caller's response must never ride along with
  the next caller's request;
* no automatic decompression: compressed bodies pass through byte for byte with
  their ``content-encoding`` and ``content-length``;
* no proxy or ``.netrc`` settings from the environment;
* no default headers (``User-Agent``, ``Accept``...): the client's own are forwarded;
* a pooled, keep-alive connector whose size is a setting (0 = unlimited);
* never a request sent twice: aiohttp resends an idempotent one (a GET, which runs a model on
  fal.run) on a new connection when a kept-alive one closes under it, even after the gateway
  read it; that is turned off, as it is for every POST.
"""

from __future__ import annotations

import aiohttp

from ..config.settings import Settings
from .breaker import connection_tracing

# aiohttp adds these unless told not to; the proxy forwards the client's own instead.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def create_session(settings: Settings) -> aiohttp.ClientSession:
    """Create the shared session; call from inside the running event loop."""
    test_ca = settings.gateway.gateway_tls()  # FAL_PROXY_TEST_GATEWAY_CA_FILE, else the default
    connector = aiohttp.TCPConnector(
        ssl=test_ca if test_ca is not None else True,
        limit=settings.upstream_connections,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=30,
        enable_cleanup_closed=False,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        # Per-phase timeouts are enforced by the forwarder; aiohttp only bounds the connect.
        timeout=aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_connect=settings.connect_timeout
        ),
        # fal and Cloudflare send long headers (signed URLs, cf-aig-dlp); stay generous.
        max_line_size=16 * 1024,
        max_field_size=16 * 1024,
        read_bufsize=256 * 1024,
        # FAL_PROXY_FALLBACK: which requests opened a connection (see proxy.breaker).
        trace_configs=[connection_tracing()] if settings.gateway.fallback == "direct" else None,
    )
    # No public switch (aiohttp 3.14): the resend of idempotent requests on a connection that
    # closed under them ("retry_persistent_connection"). Pinned by a test (test_fallback.py).
    session._retry_connection = False
    return session
