"""Forward: the HTTP transport. One request through the phases of :mod:`proxy.phases`: the body
streamed up, the answer streamed down, each call's record and canonical line.

May import: errors, policy, observe, limits, config, admission, upstream, phases.
"""
