"""The parallel options of one attention call, in one place: ring schedules, Ulysses
degrees, the names of their combinations, and what each schedule does.

A schedule is named once here, with the side it moves ("q" or "kv") and whether it fetches
every span up front from its owner (all-gather) instead of passing blocks round the ring.
Everything else (the API's checks, the plan, the loop, the cache, the configs, the
simulator) asks this module; nothing else compares schedule names. Adding a schedule: its
entry in `_SCHEDULES`, and its routing in the loop (`routing.py`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    name: str
    moves: str  # the side that travels: "q" or "kv"
    fetch: bool = False  # every span fetched from its owner before any compute


_SCHEDULES = (
    Schedule("kv", "kv"),  # K/V travel, Q stays
    Schedule("q", "q"),  # TokenRing: Q travels, results return straight to their owner
    Schedule("allgather", "kv", fetch=True),  # Llama-3 / PyTorch CP all-gather, trimmed
)
RING_SCHEDULES = tuple(s.name for s in _SCHEDULES)
"""The ring schedules a call can run."""
CHOICES = ("auto", *RING_SCHEDULES)
"""What a user may ask for: a ring schedule, or "auto" (the cost model, `ringmem.plan`)."""


def schedule(name: str) -> Schedule:
    """The ring schedule called `name` (ValueError for anything else, "auto" included)."""
    for s in _SCHEDULES:
        if s.name == name:
            return s
    raise ValueError(f"schedule must be one of {RING_SCHEDULES}, got {name!r}")


def check_schedule(value: object, name: str = "schedule", auto: bool = True) -> str:
    """`value` if it names a schedule (or "auto" where `auto`), else a ValueError naming
    `name` and the value."""
    allowed = CHOICES if auto else RING_SCHEDULES
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def moving_side(name: str) -> str:
    """The side a ring schedule moves: Q for "q", K/V for "kv" and "allgather"."""
    return schedule(name).moves


def fetches(name: str) -> bool:
    """Whether a ring schedule fetches every span from its owner up front."""
    return schedule(name).fetch


@dataclass(frozen=True)
class Option:
    """One parallel option: Ulysses groups of `ulysses` ranks, a ring `schedule` across
    them. Its name: "kv" / "q" / "allgather" without Ulysses, "ulysses" when one Ulysses
    group spans every rank, else "ulysses<u>+<schedule>"."""
    ulysses: int
    schedule: str

    def name(self, world: int) -> str:
        if self.ulysses == 1:
            return self.schedule
        return "ulysses" if self.ulysses == world else f"ulysses{self.ulysses}+{self.schedule}"

    @staticmethod
    def parse(name: str, world: int) -> Option:
        """The option called `name` on `world` ranks (ValueError for anything else)."""
        if name in RING_SCHEDULES:
            return Option(1, name)
        if name == "ulysses":
            return Option(world, "kv")
        head, _, sched = name.partition("+")
        if head.startswith("ulysses") and head[7:].isdigit() and sched in RING_SCHEDULES:
            return Option(int(head[7:]), sched)
        raise ValueError(f"not a parallel option: {name!r}")
