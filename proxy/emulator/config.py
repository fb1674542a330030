"""Emulator configuration: one frozen value, with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator behaves.

    * ``fal_key``: the key it expects in ``authorization: Key <key>``; ``None`` accepts any
      ``Key …`` value (but still refuses a missing one, as fal does).
    * ``cf_token``: when set, the emulated gateway is *authenticated*: requests need
      ``cf-aig-authorization: Bearer <cf_token>`` or get Cloudflare's 401 with code 2009.
    * ``seed``: makes request ids, tokens and generated images repeatable.
    * ``time_scale``: multiplies every built-in duration (queue wait, generation time, SSE
      pauses); ``0.05`` makes a 3 s job take 0.15 s in tests.
    * ``public_url``: origin used in the URLs it hands out (files, uploads); by default the
      ``Host`` the request came in on. ``"/"`` hands out paths (``/_emulator/files/…``),
      relative to whichever origin the client reaches it on: the demo, whose page shares the
      emulator's origin, served under any name or published port.
    * ``record_limit``: how many requests the recorder keeps (oldest dropped first).
    * ``byok``: stored fal keys by alias ("Store Keys"): a request with no ``authorization``
      gets the key of its ``cf-aig-byok-alias`` (``default`` when absent); an unknown alias is
      the gateway's 400. A provider key sent along with an alias is a 400 too: stricter than
      the real gateway (reported to use the key then), so a proxy that sends both is caught.
    * ``unified_billing``: a request with no key and no alias passes (the gateway pays fal),
      unless it says ``cf-aig-no-wholesale: true`` (then 400).
    * ``gzip_queue``: gzip the queue's JSON answers (submit, status, result, cancel) for a
      request that accepts gzip, as Cloudflare's edge may.
    """

    fal_key: str | None = None
    cf_token: str | None = None
    seed: int = 0
    time_scale: float = 1.0
    public_url: str | None = None
    record_limit: int = 1000
    gzip_queue: bool = False
    byok: dict[str, str] = field(default_factory=dict)  # stored keys: alias → fal key
    unified_billing: bool = False
    token_lifetime: float = 600.0  # cap on /tokens/ token_expiration, seconds
