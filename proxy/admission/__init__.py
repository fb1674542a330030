"""Admission: the one gate both transports pass. May this request go upstream at all?

Every check before the first byte leaves, in one order (``gate``), and the caller
authenticators whose keys need I/O (``callers``). The rules themselves are pure functions in
:mod:`proxy.policy`; the counts are :mod:`proxy.limits`.

May import: errors, policy, observe, limits, config.
"""

from .gate import Admission, Admitted

__all__ = ["Admission", "Admitted"]
