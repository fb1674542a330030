"""fal-gateway-proxy: keeps the fal key server-side and forwards fal SDK calls through
Cloudflare AI Gateway. Nothing runs on import; see :mod:`proxy.cli`."""

__version__ = "0.1.0"
