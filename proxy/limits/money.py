"""Money as the limits count it: integer micro-dollars, parsed from and shown as dollars.

Sums of integers do not drift (floats would: 0.1 + 0.2); a JSON number of dollars is made
only to be shown (:func:`as_usd`), never summed again.
"""

from __future__ import annotations

import re
from decimal import Decimal

MICROS = 1_000_000  # micro-dollars in a dollar
CENT = Decimal("0.01")
_USD = re.compile(r"\d{1,9}(\.\d{1,6})?")


def parse_usd(text: str, where: str) -> int:
    """``5``, ``0.03``, ``12.50`` (dollars, at most 6 decimals) → micro-dollars."""
    text = text.strip()
    if not _USD.fullmatch(text):
        raise ValueError(
            f"{where}: a budget is dollars like $5, $0.03 or $12.50 (at most 6 decimals)"
        )
    return int(Decimal(text) * MICROS)


def usd(micros: int, *, plain: bool = False) -> str:
    """``$5.00``, ``$0.0025`` (at least cents; ``plain``: as short as exact, ``$5``)."""
    amount = Decimal(micros) / MICROS
    if not plain and (cents := amount.quantize(CENT)) == amount:
        return f"${cents}"
    return f"${format(amount.normalize(), 'f')}"


def as_usd(micros: int) -> float:
    """Micro-dollars as a JSON number of dollars (for pages and metrics, not for sums)."""
    return micros / MICROS
