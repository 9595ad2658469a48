"""The registry of parallel options (`ringmem.options`): names round-trip, every schedule
says what it moves, bad names are refused by name."""
from __future__ import annotations

import pytest

import ringmem
from ringmem.options import (
    CHOICES,
    RING_SCHEDULES,
    Option,
    check_schedule,
    fetches,
    moving_side,
    schedule,
)


def test_every_option_name_round_trips() -> None:
    for world in (1, 2, 4, 8):
        for u in (d for d in (1, 2, 4, 8) if world % d == 0):
            for s in RING_SCHEDULES:
                o = Option(u, s)
                back = Option.parse(o.name(world), world)
                # "ulysses" over every rank runs no ring: its schedule is "kv"
                assert back == (Option(world, "kv") if u == world > 1 else o)


def test_schedules_say_what_they_move() -> None:
    assert [moving_side(s) for s in RING_SCHEDULES] == ["kv", "q", "kv"]
    assert [fetches(s) for s in RING_SCHEDULES] == [False, False, True]
    assert ringmem.SCHEDULES == CHOICES == ("auto", *RING_SCHEDULES)


@pytest.mark.parametrize("bad", ["ring", "", None, 3, "auto "])
def test_bad_names_are_refused_by_name(bad) -> None:
    with pytest.raises(ValueError, match=r"prefill_schedule must be one of .*got"):
        check_schedule(bad, "prefill_schedule")
    with pytest.raises(ValueError, match="not a parallel option"):
        Option.parse(str(bad), 4)
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule(str(bad))


def test_auto_is_a_choice_not_a_schedule() -> None:
    assert check_schedule("auto") == "auto"
    with pytest.raises(ValueError, match="must be one of"):
        check_schedule("auto", auto=False)
