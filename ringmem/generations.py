"""Cross-rank atomic checkpoints: a directory of generations switched by one manifest.

A checkpoint directory `root` holds

    MANIFEST.json      {"generation": n, "dir": "gen-<n>", ...}: the commit point
    gen-<n>/           the current generation: every rank's files, and rank<r>.ok markers

`save` (collective over `group`) runs four phases, each closed by an `agree`, so an error
on any rank is raised on every rank and no rank waits forever:

1. prepare: every rank reads the manifest (current generation c) and runs the caller's
   `prepare` (validation, gathering state); rank 0 removes leftovers that the manifest
   does not name (generations of failed saves, temp files) and creates gen-<c+1>. The
   ranks must agree on c + 1 (else they do not share one directory).
2. write: every rank writes its files into gen-<c+1> and an fsynced marker. Confirm: on
   an error anywhere every rank raises and rank 0 deletes gen-<c+1>; gen-<c> is untouched.
3. switch: rank 0 checks every rank's marker, writes MANIFEST.json.tmp, fsyncs it and
   `os.replace`s it onto MANIFEST.json (then fsyncs root): the one commit point. If that
   fails every rank raises and the manifest still names gen-<c>.
4. rank 0 removes gen-<c>. A failure here (the commit is done) only warns: the next save
   or load sweeps the leftover.

`load` reads the manifest (never "the newest directory"), agrees on the generation, reads
it, and once every rank succeeded rank 0 sweeps leftovers. A root must be one directory
seen by every rank (a shared filesystem for several hosts), as for any cross-rank commit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, TypeVar

from .agree import PeerError, agree
from .comm import Group, group_rank_world

MANIFEST = "MANIFEST.json"
FORMAT, VERSION = "ringmem.generations", 1
_GEN = re.compile(r"gen-(\d{6,})")
P, T = TypeVar("P"), TypeVar("T")

_fault_hook: Callable[[str, int], None] | None = None
"""Tests only: called as hook(point, rank) at "prepare", "written", "switch" (rank 0,
before the manifest's os.replace) and "switched" (rank 0, after it); may raise."""


class CheckpointError(OSError):
    """A collective save or load failed (on this rank, or on the ranks it names)."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def gen_name(n: int) -> str:
    return f"gen-{n:06d}"


def read_manifest(root: str | Path, rank: int = 0) -> dict[str, Any] | None:
    """The verified manifest of `root`, or None when there is none (no checkpoint yet)."""
    path = Path(root) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        man = json.loads(text)
        ok = man.pop("crc32", None) == _crc(man)
        ok = ok and man["format"] == FORMAT and isinstance(man["generation"], int)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"rank {rank}: checkpoint manifest {path} is unreadable ({e}); "
                         f"move it aside to start over") from None
    if not ok:
        raise ValueError(f"rank {rank}: checkpoint manifest {path} is corrupt (CRC-32 or "
                         f"format mismatch); move it aside to start over")
    if man.get("version") != VERSION:
        raise ValueError(f"rank {rank}: checkpoint manifest {path} has version "
                         f"{man.get('version')!r}, this ringmem reads {VERSION}")
    return man


def current(root: str | Path) -> Path:
    """The directory of the generation that `root`'s manifest names (local, no collective)."""
    man = read_manifest(root)
    if man is None:
        raise FileNotFoundError(f"no checkpoint under {root} ({Path(root) / MANIFEST} "
                                f"missing)")
    return Path(root) / gen_name(man["generation"])


def save(root: str | Path, write: Callable[[Path, P], T], *, group: Group, op: str,
         prepare: Callable[[], P] | None = None, fsync: bool = True,
         **fields: object) -> T:
    """Write a new generation of `root` on every rank and commit it atomically (collective).

    prepare() (every rank, before anything is written) returns what write(gen_dir, that)
    puts into gen_dir (its files synced when `fsync`). Either may be collective only if
    it fails on every rank alike (torch.distributed.checkpoint does). `fields` must agree
    across ranks (see `agree`). Returns write's result.

    Raises on every rank if any rank failed: there its own error (an OSError wrapped in
    CheckpointError naming rank, path and what is kept), elsewhere CheckpointError naming
    the ranks that failed. The previous generation then stays current and whole.
    """
    root = Path(root)
    rank, world = group_rank_world(group)
    error, cur, staged, made = None, None, None, False
    kept = f"nothing under {root} was changed"
    try:
        man = read_manifest(root, rank)
        cur = None if man is None else man["generation"]
        kept = (f"the checkpoint under {root} stays at generation {cur}" if cur is not None
                else f"{root} still holds no checkpoint")
        staged = prepare() if prepare is not None else None
        _hook("prepare", rank)
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            _sweep(root, cur)
            (root / gen_name((cur or 0) + 1)).mkdir()  # a leftover we could not sweep fails
            made = True
    except Exception as e:
        error = e
    new = (cur or 0) + 1
    gen = root / gen_name(new)
    try:
        _phase(op, group, error, rank, f"preparing {gen}", kept, generation=new, **fields)
    except BaseException:
        if made:
            _remove(gen)  # nothing of a failed save is kept
        raise

    error, out = None, None
    try:
        gen.mkdir(parents=True, exist_ok=True)  # made by rank 0 on a shared root
        out = write(gen, staged)
        write_file(gen / f"rank{rank}.ok", b"", fsync)
        if fsync:
            fsync_dir(gen)
        _hook("written", rank)
    except Exception as e:
        error = e
    try:
        _phase(op, group, error, rank, f"writing {gen}", kept)
    except BaseException:
        if rank == 0:
            _remove(gen)
        raise

    error = None
    if rank == 0:
        tmp = root / (MANIFEST + ".tmp")
        try:
            missing = [r for r in range(world) if not (gen / f"rank{r}.ok").exists()]
            if missing:
                raise CheckpointError(f"rank 0 does not see the files of rank(s) {missing} "
                                      f"in {gen}: {root} must be one directory shared by "
                                      f"every rank")
            man = {"format": FORMAT, "version": VERSION, "generation": new,
                   "dir": gen.name, "world_size": world, "op": op}
            man["crc32"] = _crc(man)
            write_file(tmp, json.dumps(man).encode(), fsync)
            _hook("switch", rank)
            os.replace(tmp, root / MANIFEST)  # the commit point, for every rank at once
        except Exception as e:
            error = e
            _remove(tmp)
            _remove(gen)
        if error is None:
            try:
                if fsync:
                    fsync_dir(root)
                _hook("switched", rank)
                _sweep(root, new)  # the previous generation, now superseded
            except Exception as e:  # committed: the next save or load sweeps what is left
                warnings.warn(f"{op}: generation {new} under {root} is committed, but "
                              f"removing the previous one failed: {e}", RuntimeWarning,
                              stacklevel=2)
    _phase(op, group, error, rank, f"switching {root / MANIFEST} to {gen.name}", kept)
    return out


def load(root: str | Path, read: Callable[[Path], T], *, group: Group, op: str,
         legacy: Callable[[Path], bool] | None = None,
         fields: Callable[[T], dict[str, Any]] | None = None,
         explain: dict[str, str] | None = None) -> T:
    """Read the generation `root`'s manifest names on every rank (collective): read(gen_dir)
    (may be collective if it fails on every rank alike). `legacy(root)`: true when root
    holds a checkpoint from before generations (read(root) then). `fields(result)`: more
    values that must agree across ranks (`explain`: what a difference means, see `agree`).
    Leftovers are swept once every rank succeeded."""
    root = Path(root)
    rank, _ = group_rank_world(group)
    error, where, gen = None, root, None
    try:
        man = read_manifest(root, rank)
        if man is not None:
            gen = man["generation"]
            where = root / gen_name(gen)
        elif legacy is None or not legacy(root):
            raise FileNotFoundError(f"rank {rank}: no checkpoint under {root} "
                                    f"({root / MANIFEST} missing)")
    except Exception as e:
        error = e
    agree(op, group, error, generation=gen)
    error, out, extra = None, None, {}
    try:
        out = read(where)
        extra = fields(out) if fields is not None else {}
    except Exception as e:
        error = e
    # a failed rank sends no fields: its error comes first
    agree(op, group, error, explain=explain, **extra)
    if rank == 0 and gen is not None:
        try:
            _sweep(root, gen)
        except OSError as e:
            warnings.warn(f"{op}: could not remove leftovers under {root}: {e}",
                          RuntimeWarning, stacklevel=2)
    return out


def write_file(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` (a new file in a generation), synced when `fsync`."""
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------- internals
def _phase(op: str, group: Group, error: BaseException | None, rank: int, what: str,
           kept: str, **fields: object) -> None:
    """agree() with messages that say which rank failed, where, and what is kept. A local
    PeerError (a collective writer failed because of other ranks) counts as theirs."""
    try:
        agree(op, group, error, **fields)
    except PeerError as e:
        raise CheckpointError(f"{op}: rank(s) {e.ranks} failed {what} (see the error "
                              f"raised there); {kept}") from None
    except OSError as e:
        if e is not error or isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{op}: rank {rank} failed {what}: {e}; {kept}") from e


def _hook(point: str, rank: int) -> None:
    if _fault_hook is not None:
        _fault_hook(point, rank)


def _sweep(root: Path, keep: int | None) -> None:
    """Remove generations other than `keep` and temp files (rank 0, between phases)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = _GEN.fullmatch(p.name)
        if (m and int(m.group(1)) != keep) or p.name.startswith(MANIFEST + ".tmp"):
            _remove(p, strict=True)


def _remove(p: Path, strict: bool = False) -> None:
    """Delete a file or tree; strict=False: best effort (it is a leftover either way)."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    except OSError:
        if strict:
            raise




def _crc(man: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(man, sort_keys=True).encode())
