"""proxy.admission.queue_owners: a queue request's id noted with its caller; another caller
refused, the id's case ignored, the first note kept, the oldest notes dropped past the caps
(a caller's own past its cap: never another caller's)."""

from __future__ import annotations

import pytest

from proxy.admission.queue_owners import QueueOwners, QueueRequestRefused

ID = "d95bafc8-f2a4-427b-9cf4-bb99f4bea973"


def test_only_the_noted_caller_passes_whatever_the_ids_case() -> None:
    owners = QueueOwners()
    owners.note(ID, "alice")
    owners.check(ID, "alice")
    owners.check(ID.upper(), "alice")
    for named in (ID, ID.upper()):
        with pytest.raises(QueueRequestRefused) as refused:
            owners.check(named, "bob")
        assert refused.value.status == 403
        assert "FAL_PROXY_QUEUE_OWNER_CHECK" in (refused.value.hint or "")
    owners.check("an-id-never-noted", "bob")  # unknown here: not refused


def test_the_first_note_of_an_id_stands() -> None:
    owners = QueueOwners()
    owners.note(ID, "alice")
    owners.note(ID.upper(), "bob")
    owners.check(ID, "alice")
    with pytest.raises(QueueRequestRefused):
        owners.check(ID, "bob")


def test_past_the_cap_the_oldest_note_goes_first() -> None:
    owners = QueueOwners(size=3)
    for n in range(4):
        owners.note(f"id-{n}", "alice")
    assert len(owners) == 3
    owners.check("id-0", "bob")  # dropped: let through
    for n in (1, 2, 3):
        with pytest.raises(QueueRequestRefused):
            owners.check(f"id-{n}", "bob")


def test_a_callers_submits_push_out_only_its_own_notes() -> None:
    owners = QueueOwners(size=100, per_caller=3)
    owners.note("victim-id", "alice")
    for n in range(50):  # bob submits on and on
        owners.note(f"bob-{n}", "bob")
    assert len(owners) == 4  # alice's one, bob's newest three
    with pytest.raises(QueueRequestRefused):
        owners.check("victim-id", "bob")
    owners.check("bob-46", "alice")  # bob's oldest went: let through
    with pytest.raises(QueueRequestRefused):
        owners.check("bob-49", "alice")


def test_past_the_cap_in_all_each_callers_count_follows() -> None:
    owners = QueueOwners(size=4, per_caller=3)
    for n in range(40):
        owners.note(f"id-{n}", ("alice", "bob", "carol")[n % 3])
        assert len(owners) <= 4
    assert sum(len(ids) for ids in owners._of.values()) == len(owners)
    for n in range(36, 40):  # the newest four are held, each its caller's
        with pytest.raises(QueueRequestRefused):
            owners.check(f"id-{n}", "nobody")
