"""App: the ASGI assembly. Builds the forwarder, the bridge and the small Starlette routes once,
and routes each connection by the port it arrived on (a ``{port: app}`` map built at start).

May import: errors, policy, observe, limits, config, admission, upstream, phases, forward, bridge,
dashboard.
"""
