"""ringmem.sim: how one attention layer runs on 8 or 1024 devices, by simulation.

Routing and bytes come from `ringmem.plan` (one source of truth); this package models only
time: a kernel model (`kernel.Profile`), a link model (`network.Network`) and an
event-level ring loop (`engine`). `model.simulate` ties them together.
"""
from .engine import PhaseResult, simulate_phase, split_piece
from .kernel import Impl, Library, Profile, load_library, load_profile, piece_flops
from .model import SimResult, simulate, single_s
from .network import Network

__all__ = ["Impl", "Library", "Network", "PhaseResult", "Profile", "SimResult", "load_library",
           "load_profile", "piece_flops", "simulate", "simulate_phase", "single_s",
           "split_piece"]
