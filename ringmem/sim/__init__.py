"""ringmem.sim: how one attention layer runs on 8 or 1024 devices, by simulation.

Routing and bytes come from `ringmem.plan` and time from the event-level ring loop
`ringmem.timeline`, the same as `plan()`'s; links from `ringmem.links`. This package adds
what a cluster study needs beyond `plan()`: device profiles measured or published
(`kernel.Profile`), published results to check against, sweeps and reports.
`model.simulate` ties them together.
"""
from ..timeline import Impl, PhaseResult, simulate_phase, split_piece
from .kernel import Library, Profile, load_library, load_profile, piece_flops
from .model import SimResult, simulate, single_s

__all__ = ["Impl", "Library", "PhaseResult", "Profile", "SimResult", "load_library",
           "load_profile", "piece_flops", "simulate", "simulate_phase", "single_s",
           "split_piece"]
