"""Checkpoints of a training run with `torch.distributed.checkpoint` (DCP).

Model and optimizer state go through DCP's sharded format (each rank writes its FSDP
shards); the scheduler, the step (which fixes the data position: rows are a function of
the step) and every rank's RNG state go beside them. The checkpoint directory holds
generations (`ringmem.generations`): each save writes `gen-<n>/` on every rank, all ranks
confirm, then rank 0 switches `MANIFEST.json` to it in one `os.replace` and only then
removes the previous generation. A save that fails on any rank (full disk, a crash
mid-write) leaves the previous checkpoint current and whole; its leftovers are removed by
the next save or load. `load` reads the generation the manifest names.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import generations
from ..agree import PeerError

DONE = "COMPLETE.json"
"""Rank 0's file in a generation: step, world size, scheduler state."""


def _rng() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _dcp(fn: Any, state: dict[str, Any], where: Path, what: str) -> None:
    """dcp.save / dcp.load. DCP raises its failure on every rank alike (as a
    BaseException): here an OSError naming the directory on the ranks that failed, a
    PeerError naming them on the others."""
    try:
        fn(state, checkpoint_id=str(where))
    except CheckpointException as e:
        rank, failed = dist.get_rank(), e.failures
        if rank not in failed:
            raise PeerError(f"rank(s) {sorted(failed)} failed {what} {where}",
                            sorted(failed)) from None
        cause = failed[rank][0] if isinstance(failed[rank], tuple) else failed[rank]
        if isinstance(cause, OSError) and what == "writing":
            raise cause from None  # generations.save adds the rank and the path
        raise OSError(f"rank {rank}: {what} {where} failed: {cause}") from None


def save(run: Any, path: str | Path) -> Path:
    """Write the run's state as a new generation of `path` (a directory) and commit it
    atomically across ranks (collective). Returns the generation's directory."""
    rank = dist.get_rank()

    def prepare() -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def write(gen: Path, state: dict[str, Any]) -> Path:
        _dcp(dcp.save, state, gen, "writing")  # collective; fails on every rank alike
        buf = io.BytesIO()
        torch.save({"rng": _rng()}, buf)
        generations.write_file(gen / f"rank{rank}.pt", buf.getvalue())
        if rank == 0:
            generations.write_file(gen / DONE, json.dumps({
                "step": run.step, "world": dist.get_world_size(),
                "scheduler": run.scheduler.state_dict()}).encode())
        return gen

    return generations.save(path, write, group=None, op="train checkpoint save",
                            prepare=prepare)


def load(run: Any, path: str | Path) -> int:
    """Restore the run from the generation `path`'s manifest names (collective; a
    checkpoint from before generations, with COMPLETE.json in `path`, also loads);
    returns the step to continue from."""
    rank = dist.get_rank()

    def read(gen: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        """The local files, checked on every rank before the collective DCP load."""
        done = gen / DONE
        if not done.is_file():
            raise ValueError(f"rank {rank}: {gen} is not a complete checkpoint (no {DONE}: "
                             f"not a ringmem training checkpoint, or damaged)")
        meta = json.loads(done.read_text())
        if meta["world"] != dist.get_world_size():
            raise ValueError(f"checkpoint {gen} was written by {meta['world']} ranks; this "
                             f"run has {dist.get_world_size()}")
        rng = torch.load(gen / f"rank{rank}.pt", weights_only=False)["rng"]
        return gen, meta, rng

    gen, meta, rng = generations.load(path, read, group=None, op="train checkpoint load",
                                      legacy=lambda root: (root / DONE).is_file(),
                                      fields=lambda r: {"step": r[1]["step"]})
    model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    _dcp(dcp.load, state, gen, "reading")
    set_state_dict(run.model, run.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    run.scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    run.step = int(meta["step"])
    return run.step
