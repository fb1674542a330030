"""Config: the environment read once into frozen settings; every problem names its variable.

One module per group of settings (``access``, ``gateway``, ``python_port``), the variable
declarations and their readers (``envvars``), and the whole (``settings``). The Python port's
local certificate authority (``tls_certs``) is here because reading its settings is what
creates or loads it, once, at start-up.

May import: errors, policy, observe, limits.
"""
