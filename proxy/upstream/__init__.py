"""Upstream: the gateway side both transports share. The one HTTP session, the circuit breaker
around the gateway (``FAL_PROXY_FALLBACK=direct``), the choice of route through it, and the
mapping of an upstream failure to the client's error.

May import: errors, policy, observe, config.
"""
