"""Serve: running the app. uvicorn configured as the proxy needs it, the guarded HTTP protocol,
the TLS socket, the drain on SIGTERM and ``--workers``. Every reliance on uvicorn's internals
lives here, checked at start-up.

May import: errors, policy, observe, limits, config, admission, upstream, phases, forward,
bridge, app.
"""
