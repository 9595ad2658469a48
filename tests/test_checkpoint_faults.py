"""Fault injection into the cross-rank checkpoint protocol (`ringmem.generations`).

At 2 gloo ranks a save fails on one rank at every point of the protocol: before writing,
mid-write (a file-size limit, RLIMIT_FSIZE, or a write raising ENOSPC), after writing but
before the confirm, after the confirm but before the manifest switch, after the switch.
Each time every rank raises a clear error (or, after the switch, the save stands), the
previous checkpoint's files are untouched byte for byte, it loads bit-exact (contents and
decode outputs / model, optimizer and RNG state), and the next save or load sweeps the
leftovers of a save that could not clean up after itself. The same for training
checkpoints. And the tier store's close() survives its files being removed underneath.
"""
from __future__ import annotations

import errno
import hashlib
import resource
import shutil
import signal
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ringmem import generations
from ringmem.generations import MANIFEST, CheckpointError
from ringmem.testing import spawn

ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "test/model"


# --------------------------------------------------------------- fault helpers
def _enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (injected)", what)


@contextmanager
def _hook(point: str, rank: int):
    """Raise ENOSPC at `point` of the protocol on `rank`."""
    def hook(p: str, r: int) -> None:
        if (p, r) == (point, rank):
            raise _enospc(point)
    generations._fault_hook = hook
    try:
        yield
    finally:
        generations._fault_hook = None


@contextmanager
def _fsize_limit(nbytes: int):
    """A file-size limit on this process: writes beyond it fail with EFBIG (disk full)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


@contextmanager
def _patched(module, name: str, fn):
    real = getattr(module, name)
    setattr(module, name, fn(real))
    try:
        yield
    finally:
        setattr(module, name, real)


def _fail_nth(n: int):
    """A write function that raises ENOSPC on its n-th call (a disk filling up)."""
    def wrap(real):
        calls = []

        def write(path, *a, **kw):
            calls.append(path)
            if len(calls) == n:
                raise _enospc(str(path))
            return real(path, *a, **kw)
        return write
    return wrap


def _fail_manifest(real):
    def write(path, *a, **kw):
        if Path(path).name.startswith(MANIFEST):
            raise _enospc(str(path))
        return real(path, *a, **kw)
    return write


def _no_cleanup(real):  # a save that dies before cleaning up (killed, power cut)
    return lambda *a, **kw: None


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).contiguous().view(torch.uint8),
        b.reshape(-1).contiguous().view(torch.uint8)))


def _files(root: Path) -> dict[str, str]:
    """Every file under root -> sha256 (the checkpoint's bytes)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _expect_failure(save, rank: int, bad: int, root: Path, gen: int, cause: str) -> None:
    """save() raises on every rank: the failing rank names itself, the cause and the path;
    the others name it; both say which generation is kept."""
    with pytest.raises(CheckpointError) as info:
        save()
    msg = str(info.value)
    assert f"stays at generation {gen}" in msg and str(root) in msg, msg
    if rank == bad:
        assert f"rank {bad} failed" in msg and cause in msg, msg
    else:
        assert f"rank(s) [{bad}] failed" in msg, msg


# ------------------------------------------------------------- cache checkpoints
def _cache_faults(rank: int, world: int, root_s: str) -> None:
    from ringmem.cache import CacheConfig, ShardedKVCache, TierPolicy
    from ringmem.cache.tiers import persist
    from ringmem.eviction import H2O, EvictionPolicy
    root = Path(root_s)
    hq, hkv, d, n = 4, 2, 8, 12 * world
    g = torch.Generator().manual_seed(3)
    Q, K, V = (torch.randn(n + 64, h, d, generator=g, dtype=torch.float64).to(torch.bfloat16)
               for h in (hq, hkv, hkv))
    cfg = CacheConfig(num_layers=2, q_heads=hq, kv_heads=hkv, head_dim=d, capacity=64,
                      page_size=4, dtype=torch.bfloat16)
    pol = EvictionPolicy(scorer=H2O(), budget=10, sinks=1, recent=2, decode_every=3)

    def tiers() -> TierPolicy:
        return TierPolicy(host_pages=1, disk_pages=64, disk_dir=tempfile.mkdtemp(), recall=2)

    def decode(cache, t: int) -> list[torch.Tensor]:
        return [cache.decode(i, Q[None, t:t + 1], K[None, t:t + 1], V[None, t:t + 1])
                for i in range(cfg.num_layers)]

    def contents(cache) -> list[torch.Tensor]:
        """What a checkpoint holds: pools, tier pages, pending entries, observation window
        (as the save sees them), page tables, counts, eviction state."""
        out = []
        for i, s in enumerate(cache.stores):
            out += [s.k, s.v, s.pos, s.score]
            out += list(cache.tiers.export(i, cfg.max_seqs)[0].values())
            out += list(cache.eviction.obs.export(i).values())
        out = [t.detach().clone() for t in out]
        return out + [repr([(s.tables, s.hlens, s.lens, s.free_list) for s in cache.stores]),
                      repr(cache.index.state()), repr(cache.eviction.state())]

    t = n  # the next position to decode
    a = ShardedKVCache(cfg, eviction=pol, tiers=tiers())
    for i in range(cfg.num_layers):
        for lo in range(0, n, 4 * world):
            a.prefill_chunk(i, *(a.shard_chunk(x[None, lo:lo + 4 * world]) for x in (Q, K, V)))
    a.compress()

    def commit() -> tuple[list, list, int]:
        """Save a (it must succeed), then run a on: its contents and next decode outputs
        are what a load of this checkpoint must give."""
        nonlocal t
        a.save(root, model_id=MODEL_ID)
        want = contents(a), [decode(a, t + j) for j in range(2)], t
        t += 3  # a moves on: a later save holds different state
        decode(a, t - 1)
        return want

    def check(want: tuple[list, list, int]) -> None:
        """Load root: contents and decode outputs bit-exact with the saved cache's."""
        ref, outs, at = want
        b = ShardedKVCache.load(root, cfg, model_id=MODEL_ID, eviction=pol, tiers=tiers())
        got = contents(b)
        assert len(got) == len(ref) and all(
            _same_bytes(x, y) if isinstance(x, torch.Tensor) else x == y
            for x, y in zip(got, ref))
        for j, w in enumerate(outs):
            assert all(torch.equal(x, y) for x, y in zip(decode(b, at + j), w)), j
        b.close()

    def save() -> None:
        a.save(root, model_id=MODEL_ID)

    def after_failure(gen: int, files: dict[str, str], extra: tuple[str, ...] = ()) -> None:
        dist.barrier()
        if rank == 0:  # nothing of the failed save, the kept generation byte for byte
            assert _listing(root) == sorted([MANIFEST, generations.gen_name(gen), *extra])
            assert _files(root / generations.gen_name(gen)) == files
        dist.barrier()

    for _ in range(2):  # decode a little first: eviction counters and windows matter
        decode(a, t)
        t += 1
    want = commit()  # generation 1
    check(want)
    files = _files(root / "gen-000001") if rank == 0 else {}
    cases = [  # (failing rank, its error's cause, the fault)
        (1, "injected", lambda: _hook("prepare", 1)),  # before writing
        (1, "File too large", lambda: _fsize_limit(2048) if rank == 1 else _null()),
        (0, "No space left", lambda: _patched(persist, "write_record", _fail_nth(2))
         if rank == 0 else _null()),
        (1, "injected", lambda: _hook("written", 1)),
        (0, "injected", lambda: _hook("written", 0)),
        (0, "injected", lambda: _hook("switch", 0)),  # after the confirm, before the switch
        (0, "No space left", lambda: _patched(generations, "write_file", _fail_manifest)
         if rank == 0 else _null()),  # writing the new manifest itself
    ]
    for bad, cause, fault in cases:
        with fault():
            _expect_failure(save, rank, bad, root, 1, cause)
        after_failure(1, files)
        check(want)
    # after the switch: the new generation stands; removing the old one fails (a warning),
    # the next load sweeps it
    with _hook("switched", 0), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = commit()  # generation 2
    assert rank != 0 or any("is committed" in str(w.message) for w in caught)
    dist.barrier()
    if rank == 0:
        assert _listing(root) == [MANIFEST, "gen-000001", "gen-000002"]
    dist.barrier()
    check(want)
    dist.barrier()
    if rank == 0:
        assert _listing(root) == [MANIFEST, "gen-000002"]
        (root / (MANIFEST + ".tmp")).write_text("{")  # a switch cut short
    files = _files(root / "gen-000002") if rank == 0 else {}
    # a save that dies without cleaning up leaves gen-000003 half written: loads and the
    # next save ignore it, the next save sweeps it
    with _patched(generations, "_remove", _no_cleanup), _hook("written", 1):
        _expect_failure(save, rank, 1, root, 2, "injected")
    after_failure(2, files, extra=("gen-000003", MANIFEST + ".tmp"))
    check(want)
    want = commit()  # generation 3, swept and rewritten
    dist.barrier()
    if rank == 0:
        assert _listing(root) == [MANIFEST, "gen-000003"]
    check(want)
    a.close()


@contextmanager
def _null():
    yield


@pytest.mark.parametrize("world", [2, 3])
def test_cache_save_fault_at_every_point_keeps_previous_checkpoint(tmp_path, world: int) -> None:
    spawn(_cache_faults, world, str(tmp_path / "ckpt"), timeout=180)


# ---------------------------------------------------------- training checkpoints
def _snapshot(run) -> dict:
    """This rank's model and optimizer shards, step, scheduler and CPU RNG (all cloned)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor
    model_sd, optim_sd = get_state_dict(run.model, run.optimizer)

    def flat(x, key: str, out: dict) -> dict:
        if isinstance(x, dict):
            for k, v in x.items():
                flat(v, f"{key}/{k}", out)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                flat(v, f"{key}/{i}", out)
        elif isinstance(x, torch.Tensor):
            out[key] = (x.to_local() if isinstance(x, DTensor) else x).detach().clone()
        else:
            out[key] = x
        return out
    return flat({"model": model_sd, "optim": optim_sd, "step": run.step,
                 "sched": run.scheduler.state_dict(), "rng": torch.get_rng_state()}, "", {})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        _same_bytes(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
        for k in a)


def _train_faults(rank: int, world: int, root_s: str, cfg) -> None:
    from ringmem.train import loop, state
    root = Path(root_s)
    run = loop.build(cfg, world)
    loop.train_step(run)

    def move_on() -> None:
        """Change the run's state: a later save holds different state."""
        with torch.no_grad():
            for p in run.model.parameters():
                p.to_local().add_(1.0)
        run.step += 1
        torch.rand(3)

    def commit() -> dict:
        state.save(run, root)
        want = _snapshot(run)
        move_on()
        return want

    def check(want: dict) -> None:
        state.load(run, root)
        assert _same(_snapshot(run), want)
        move_on()

    def save() -> None:
        state.save(run, root)

    want = commit()  # generation 1
    files = _files(root / "gen-000001") if rank == 0 else {}
    for bad, cause, fault in [
            (1, "injected", lambda: _hook("prepare", 1)),
            (1, "File too large", lambda: _fsize_limit(4096) if rank == 1 else _null()),
            (1, "injected", lambda: _hook("written", 1)),
            (0, "injected", lambda: _hook("switch", 0))]:
        with fault():
            _expect_failure(save, rank, bad, root, 1, cause)
        dist.barrier()
        if rank == 0:
            assert _listing(root) == [MANIFEST, "gen-000001"]
            assert _files(root / "gen-000001") == files
        check(want)
    with _hook("switched", 0), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = commit()  # generation 2; gen-000001 is left over
    with _patched(generations, "_remove", _no_cleanup), _hook("written", 0):
        _expect_failure(save, rank, 0, root, 2, "injected")  # gen-000003 half written
    check(want)  # the load sweeps both leftovers
    dist.barrier()
    if rank == 0:
        assert _listing(root) == [MANIFEST, "gen-000002"]
    want = commit()
    check(want)


@pytest.mark.slow
def test_train_save_fault_at_every_point_keeps_previous_checkpoint(tmp_path) -> None:
    from ringmem.train.config import TrainConfig, from_dict

    from _demo import require_demo
    require_demo()  # the tokenizer and the KJV text
    cfg = from_dict(TrainConfig, dict(
        model=f"random:{ROOT / 'configs' / 'models' / 'llama_tiny'}", seq_len=128,
        steps=4, warmup=1, max_documents=8, batch=1))
    spawn(_train_faults, 2, str(tmp_path / "ckpt"), cfg, timeout=240)


# --------------------------------------------------------------- close() robustness
def test_tier_store_close_survives_removed_files(tmp_path) -> None:
    from ringmem.cache.tiers import TierPolicy, TierStore
    for remove in ("one file", "directory"):
        store = TierStore(TierPolicy(host_pages=1, disk_pages=8, segment_pages=1,
                                     disk_dir=str(tmp_path / remove)),
                          kv_heads=2, head_dim=8, page_size=4, dtype=torch.float32)
        for i in range(4):
            store.demote((0, 0, i), torch.randn(2, 4, 8), torch.randn(2, 4, 8),
                         torch.arange(4) + 4 * i)
        assert len(list(store.dir.glob("*.page"))) == 3
        if remove == "one file":
            next(store.dir.glob("*.page")).unlink()
            (store.dir / "x.page.tmp").write_bytes(b"")  # a write cut short
        else:
            shutil.rmtree(store.dir)
        store.close()
        store.close()  # twice: still fine
        assert not store.dir.exists() and len(store) == 0


# --------------------------------------------------- checkpoints from before generations
def test_cache_checkpoint_without_manifest_still_loads(tmp_path) -> None:
    """A checkpoint written before generations (rank<r>.json directly under root) loads;
    the next save commits a generation beside it and loads follow the manifest."""
    from ringmem.cache import CacheConfig, ShardedKVCache
    cfg = CacheConfig(num_layers=1, q_heads=4, kv_heads=2, head_dim=8, capacity=32,
                      page_size=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    a = ShardedKVCache(cfg)
    a.prefill_chunk(0, *(torch.randn(1, 9, h, 8, generator=g) for h in (4, 2, 2)))
    a.save(tmp_path / "new", model_id=MODEL_ID)
    old = tmp_path / "old"  # the same shard in the old layout
    shutil.copytree(generations.current(tmp_path / "new"), old)
    b = ShardedKVCache.load(old, cfg, model_id=MODEL_ID)
    assert b.next_position() == 9 and torch.equal(b.stores[0].k, a.stores[0].k)
    a.decode(0, *(torch.randn(1, 1, h, 8, generator=g) for h in (4, 2, 2)))
    a.save(old, model_id=MODEL_ID)
    assert ShardedKVCache.load(old, cfg, model_id=MODEL_ID).next_position() == 10
    with pytest.raises(FileNotFoundError, match=f"rank 0: no checkpoint under {tmp_path}"):
        ShardedKVCache.load(tmp_path, cfg, model_id=MODEL_ID)
