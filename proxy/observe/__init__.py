"""Observe: what the proxy tells its operator. Logs (structlog, one canonical line per request),
the redaction of every secret from every logger, Prometheus metrics and request ids.

May import: errors, policy.
"""
