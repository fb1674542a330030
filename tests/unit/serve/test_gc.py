"""tune_gc: what start-up leaves the cyclic garbage collector set to."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from proxy.serve.server import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    if enabled:
        gc.enable()


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_freezes_start_up_and_sets_the_thresholds() -> None:
    gc.unfreeze()
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 0  # what was alive at start-up is out of the collector's sight
    assert gc.isenabled()  # tuned, not turned off: cycles are still freed


def test_thresholds_keep_full_collections_as_rare_and_young_ones_small() -> None:
    young, middle, old = GC_THRESHOLDS
    # Net allocations between two full collections: as with the former (20_000, 20, 20).
    assert young * middle * old == 20_000 * 20 * 20
    # Generation 1 holds at most young * middle survivors of generation 0 (400,000 before).
    assert young * middle <= 20_000 * 20 // 10
    # Generation 0 stays well above the default 700 (the per-request CPU).
    assert young >= 5_000
