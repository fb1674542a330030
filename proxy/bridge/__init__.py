"""Bridge: the WebSocket transport. One socket through the phases of :mod:`proxy.phases`: the
upstream handshake, frames both ways, each session's record and canonical line.

May import: errors, policy, observe, limits, config, admission, upstream, phases.
"""
