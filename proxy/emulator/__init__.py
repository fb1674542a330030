"""An offline emulator of Cloudflare AI Gateway in front of fal: no account, no network.

    from proxy.emulator import EmulatorConfig, create_emulator
    app = create_emulator(EmulatorConfig(fal_key="test-key", time_scale=0.05))
    # serve `app` with any ASGI server, then point the proxy at
    #   FAL_PROXY_GATEWAY_URL=http://127.0.0.1:<port>/v1/<any account>/<any gateway>/fal

or from the command line: ``fal-gateway-proxy emulator --port 9000``.

Gateway (``/v1/{account}/{gateway}/fal``): path mode (``…/fal/<path>`` is
``https://fal.run/<path>``) and target mode (bare ``…/fal`` with ``x-fal-target-url`` for
``queue.fal.run`` and ``rest.fal.ai``); ``authorization: Key <key>`` checked against
``fal_key``; with ``cf_token`` set, ``cf-aig-authorization: Bearer <cf_token>`` is required
and a wrong one gets Cloudflare's 401 with code 2009; every answer carries
``x-fal-request-id``, ``cf-aig-log-id`` and ``cf-aig-cache-status``.

fal: the apps in :mod:`proxy.emulator.apps` (text to image with real PNGs, echo), sync
runs (POST, and GET with the input in the query), ``/stream`` SSE, 422 validation errors
in fal's shape; the queue (:mod:`proxy.emulator.queue`: submit, status with logs, status
SSE, result, cancel); storage uploads, single and multipart, and ``/tokens/``
(:mod:`proxy.emulator.storage`); the realtime WebSocket (:mod:`proxy.emulator.realtime`);
fault-injection apps under ``emulator/`` (:mod:`proxy.emulator.faults`). A request addressed
to one of fal's own names (``Host: fal.run``: a TLS front mapping that name here hands it
over) is that fal host's, as on ``/_fal/<host>/…`` (:mod:`proxy.emulator.fal_names`).

Control paths, outside the gateway prefix:

=================================  ======================================================
``GET /_emulator/requests``        every request received, oldest first (method, raw
                                   path, query, headers, body head and digest, target)
``DELETE /_emulator/requests``     forget them (and events, gates, counters; end the
                                   queue's hold and let its held jobs go)
``GET /_emulator/events``          out-of-band events (a client gone mid-wait)
``POST /_emulator/gates/<name>``   release a gate a fault app waits on
``POST /_emulator/queue/hold``     hold queue jobs submitted from now on: each stops
                                   IN_QUEUE, then IN_PROGRESS before its first log line,
                                   until released (``DELETE``: stop holding new ones)
``POST /_emulator/queue/release``  move every held job on by one stop; its clock runs
                                   from there (answers ``{"released": {id: status}}``)
``GET /_emulator/files/<name>``    generated images and uploaded files
``PUT/POST /_emulator/uploads/…``  where signed upload URLs point
``GET /_emulator/health``          ``{"status": "ok"}``
=================================  ======================================================

Deterministic: request ids, tokens and images follow ``seed``; every duration is
multiplied by ``time_scale``.
"""

from .app import Emulator
from .config import EmulatorConfig


def create_emulator(config: EmulatorConfig | None = None) -> Emulator:
    """The emulator as an ASGI app."""
    return Emulator(config or EmulatorConfig())


__all__ = ["Emulator", "EmulatorConfig", "create_emulator"]
