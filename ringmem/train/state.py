"""Checkpoints of a training run with `torch.distributed.checkpoint` (DCP).

Model and optimizer state go through DCP's sharded format (each rank writes its FSDP
shards); the scheduler, the step (which fixes the data position: rows are a function of
the step) and every rank's RNG state go beside them. A checkpoint is written to
`<dir>.tmp`, every rank finishes, and only then rank 0 renames it into place, so a crash
mid-write leaves the previous checkpoint whole; `load` refuses a directory without the
marker the rename step writes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

DONE = "COMPLETE.json"


def _rng() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(run: Any, path: str | Path) -> Path:
    """Write the run's state to `path` (a directory), atomically across ranks."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"rng": _rng()}, tmp / f"rank{rank}.pt")
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        (tmp / DONE).write_text(json.dumps({"step": run.step, "world": dist.get_world_size(),
                                            "scheduler": run.scheduler.state_dict()}))
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(run: Any, path: str | Path) -> int:
    """Restore the run from `path`; returns the step to continue from."""
    path = Path(path)
    done = path / DONE
    if not done.is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {DONE}: the run stopped "
                         f"while writing it, or it is not a ringmem checkpoint)")
    meta = json.loads(done.read_text())
    if meta["world"] != dist.get_world_size():
        raise ValueError(f"checkpoint {path} was written by {meta['world']} ranks; this run "
                         f"has {dist.get_world_size()}")
    model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(run.model, run.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    run.scheduler.load_state_dict(meta["scheduler"])
    rng = torch.load(path / f"rank{dist.get_rank()}.pt", weights_only=False)["rng"]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    run.step = int(meta["step"])
    return run.step
