"""The document cache store: content keys, LRU, crash safety, the collective load/save flow
at 2 and 3 gloo ranks (exact decode after a hit; a damaged entry is a miss everywhere and
is removed), and the `ringmem cache` command."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ringmem import cli
from ringmem.jobs import store as store_mod
from ringmem.jobs.collective import load_or_none, save_entry
from ringmem.jobs.keys import content_key, key_fields, model_revision
from ringmem.jobs.store import DocCacheStore
from ringmem.testing import spawn

MODEL = "test/model"
BASE = dict(token_ids=[5, 17, 3, 99], model_id=MODEL, model_revision="rev1",
            layout="stripe", world_size=2, dtype=torch.float32,
            policy=("h2o", 10, 1, 2), extra={"chunk": 8, "page_size": 4})


# ------------------------------------------------------------------ keys
def test_each_field_changes_the_key_and_same_inputs_give_the_same_key() -> None:
    k = content_key(**BASE)
    assert len(k) == 64 and k == content_key(**dict(BASE))
    assert k == content_key(**{**BASE, "token_ids": torch.tensor([5, 17, 3, 99])})
    assert k == content_key(**{**BASE, "dtype": "float32"})  # a dtype's name is the dtype
    assert k == content_key(**{**BASE, "extra": {"page_size": 4, "chunk": 8}})  # order
    changes = {"one token": {"token_ids": [5, 17, 4, 99]},
               "one more token": {"token_ids": [5, 17, 3, 99, 0]},
               "model id": {"model_id": "test/other"}, "revision": {"model_revision": "rev2"},
               "world size": {"world_size": 3}, "layout": {"layout": "zigzag"},
               "dtype": {"dtype": torch.bfloat16}, "policy": {"policy": ("tova", 10, 1, 2)},
               "budget": {"policy": ("h2o", 11, 1, 2)}, "no policy": {"policy": None},
               "extra": {"extra": {"chunk": 16, "page_size": 4}}}
    keys = {name: content_key(**{**BASE, **c}) for name, c in changes.items()}
    assert all(v != k for v in keys.values()), keys
    assert len(set(keys.values())) == len(keys)
    f = key_fields(**BASE)
    assert f["tokens"] == 4 and f["model_id"] == MODEL and f["dtype"] == "torch.float32"
    assert f["policy"] == ["h2o", 10, 1, 2] and f["world_size"] == 2


@pytest.mark.parametrize("change, err, words", [
    ({"token_ids": []}, ValueError, "token_ids must not be empty"),
    ({"token_ids": [1, 2.5]}, TypeError, "2.5"),
    ({"token_ids": torch.ones(3)}, TypeError, "torch.float32"),
    ({"token_ids": "abc"}, TypeError, "str"),
    ({"token_ids": [2 ** 70]}, ValueError, "int64"),
    ({"world_size": 0}, ValueError, "world_size must be a positive int, got 0"),
    ({"model_id": ""}, ValueError, "model_id must be a non-empty str"),
    ({"policy": object()}, TypeError, "policy must be JSON-serialisable"),
    ({"extra": [1]}, TypeError, "extra must be a dict"),
])
def test_key_errors_name_the_argument(change, err, words) -> None:
    with pytest.raises(err, match=words.replace(".", r"\.").replace("(", r"\(")):
        content_key(**{**BASE, **change})


def test_model_revision_reads_config_and_weight_edges(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"hidden": 8}')
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    body = bytearray(3 << 20)  # 3 MiB: the middle MiB is never read
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + body)
    (d / "README.md").write_text("not part of the fingerprint")
    r = model_revision(d)
    assert r == model_revision(str(d)) and len(r) == 64

    def changed(edit) -> str:
        data = bytearray((d / "model.safetensors").read_bytes())
        edit(data)
        (d / "model.safetensors").write_bytes(data)
        return model_revision(d)
    r_tail = changed(lambda b: b.__setitem__(len(b) - 1, 1))
    assert r_tail != r
    assert changed(lambda b: b.__setitem__(len(b) // 2, 7)) == r_tail  # middle: not read
    assert changed(lambda b: b.__setitem__(20, 0x41)) != r_tail  # the header
    (d / "config.json").write_text('{"hidden": 9}')
    r_cfg = model_revision(d)
    (d / "model-2.bin").write_bytes(b"x")
    assert len({r, r_tail, r_cfg, model_revision(d)}) == 4
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        model_revision(d)
    with pytest.raises(ValueError, match="no weight file"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        model_revision(tmp_path / "empty")


# ------------------------------------------------------------------ the store alone
def _key(i: int) -> str:
    return content_key(**{**BASE, "token_ids": [i]})


def _fake_entry(store: DocCacheStore, key: str, nbytes: int, commit: bool = True) -> None:
    """An entry as a finished save leaves it: a manifest and `nbytes` of data."""
    root = store.begin(key)
    root.mkdir()
    (root / "MANIFEST.json").write_text("{}")
    (root / "data").write_bytes(bytes(nbytes))
    if commit:
        store.commit(key, {"tokens": nbytes, "fields": {"model_id": MODEL, "world_size": 2}})


@pytest.fixture
def clock(monkeypatch):
    """store's time.time() ticks one second per call: LRU order is deterministic."""
    now = [1_700_000_000.0]

    def tick() -> float:
        now[0] += 1
        return now[0]
    monkeypatch.setattr(store_mod.time, "time", tick)
    return now


def test_lru_removes_least_recently_used_and_keeps_the_new_entry(tmp_path, clock) -> None:
    s = DocCacheStore(tmp_path, max_bytes=3000)
    a, b, c, d, e = (_key(i) for i in range(5))
    for k in (a, b):
        _fake_entry(s, k, 1000)
    assert [x.key for x in s.entries()] == [b, a]  # most recent first
    assert s.lookup(a) == s.path(a)  # a is now more recent than b
    _fake_entry(s, c, 1000)  # 3 x ~1000 B plus metadata > 3000: the LRU (b) goes
    assert s.lookup(b) is None and {x.key for x in s.entries()} == {a, c}
    _fake_entry(s, d, 5000)  # larger than the cap alone: everything else goes, d stays
    assert [x.key for x in s.entries()] == [d] and s.lookup(d) is not None
    x = s.entries()[0]
    assert x.tokens == 5000 and x.bytes >= 5000 and x.fields["model_id"] == MODEL
    assert x.created <= x.last_used
    _fake_entry(s, e, 10)
    assert [x.key for x in s.entries()] == [e]
    assert DocCacheStore(tmp_path).clear() == 1 and s.entries() == []


def test_half_written_entries_are_never_returned_and_are_swept(tmp_path) -> None:
    s = DocCacheStore(tmp_path)
    a, b, c = _key(1), _key(2), _key(3)
    _fake_entry(s, a, 100, commit=False)  # a save still running (its marker names us)
    assert s.lookup(a) is None and s.entries() == []
    assert s.path(a).is_dir()  # ... so it is not swept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / a / "SAVING.json").write_text(json.dumps(
        {"pid": int(dead), "host": store_mod.socket.gethostname()}))
    _fake_entry(s, b, 100)  # a commit sweeps the dead save's directory
    assert not (tmp_path / a).exists() and s.lookup(b) is not None
    _fake_entry(s, c, 100, commit=False)
    (tmp_path / c / "SAVING.json").unlink()  # a save that died before its marker counted
    assert s.lookup(c) is None and [x.key for x in s.entries()] == [b]
    assert not (tmp_path / c).exists()
    (tmp_path / b / "entry.json").write_text('{"key": "')  # metadata cut short
    assert s.lookup(b) is None and s.entries() == []
    with pytest.raises(ValueError, match="no saved checkpoint"):
        s.begin(c)
        s.commit(c, {"tokens": 1})
    with pytest.raises(ValueError, match="key must be 64 lowercase hex digits"):
        s.path("../etc")
    with pytest.raises(ValueError, match="meta\\['tokens'\\]"):
        s.commit(c, {"fields": {}})
    with pytest.raises(ValueError, match="max_bytes must be a non-negative int"):
        DocCacheStore(tmp_path, max_bytes=-1)
    assert s.remove(c) and not s.remove(c)


def test_default_root_follows_ringmem_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RINGMEM_CACHE", str(tmp_path))
    assert DocCacheStore().root == tmp_path / "doc-caches"


# ------------------------------------------------------------------ the console command
def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(["cache", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cache_command_lists_and_removes(tmp_path, capsys) -> None:
    s = DocCacheStore(tmp_path)
    keys = sorted(_key(i) for i in range(40))
    # two keys sharing their first hex digit: that digit alone is ambiguous
    k1, k2 = next((x, y) for x, y in zip(keys, keys[1:]) if x[0] == y[0])
    k3 = next(k for k in keys if k[0] != k1[0])
    for k in (k1, k2, k3):
        _fake_entry(s, k, 2048)
    rc, out, _ = _cli(["list", "--dir", str(tmp_path)], capsys)
    assert rc == 0 and out.splitlines()[0].split() == ["KEY", "TOKENS", "SIZE", "LAST",
                                                       "USED", "MODEL", "WORLD"]
    assert all(k[:12] in out for k in (k1, k2, k3)) and MODEL in out and "3 entries" in out
    rc, _, err = _cli(["--dir", str(tmp_path), "remove", k1[0]], capsys)
    assert rc == 1 and "ambiguous" in err and k1[:12] in err and k2[:12] in err
    rc, _, err = _cli(["remove", "zzz", "--dir", str(tmp_path)], capsys)
    assert rc == 1 and "no saved document cache" in err
    rc, out, _ = _cli(["remove", k1[:10], "--dir", str(tmp_path)], capsys)
    assert rc == 0 and k1 in out and s.lookup(k1) is None and s.lookup(k2) is not None
    rc, _, err = _cli(["remove", "--dir", str(tmp_path)], capsys)
    assert rc == 1 and "--all" in err
    rc, out, _ = _cli(["remove", "--all", "--dir", str(tmp_path)], capsys)
    assert rc == 0 and "removed 2" in out and s.entries() == []
    rc, out, _ = _cli(["list", "--dir", str(tmp_path)], capsys)
    assert rc == 0 and "no saved document caches" in out


def test_cache_command_runs_as_a_console_command(tmp_path) -> None:
    _fake_entry(DocCacheStore(tmp_path / "doc-caches"), _key(7), 10)
    env = {"RINGMEM_CACHE": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1]),
           "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "ringmem.cli", "cache", "list"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and _key(7)[:12] in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ the collective flow
def _flow(rank: int, world: int, root_s: str) -> None:
    from ringmem.cache import CacheConfig, ShardedKVCache
    from ringmem.eviction import H2O, EvictionPolicy
    root = Path(root_s)
    store = DocCacheStore(root)
    hq, hkv, d, n = 4, 2, 8, 8 * world
    g = torch.Generator().manual_seed(7)
    Q, K, V = (torch.randn(n + 8, h, d, generator=g) for h in (hq, hkv, hkv))
    cfg = CacheConfig(num_layers=2, q_heads=hq, kv_heads=hkv, head_dim=d, capacity=32,
                      page_size=4, dtype=torch.float32)
    pol = EvictionPolicy(scorer=H2O(), budget=6, sinks=1, recent=2)
    ids = torch.arange(n) % 13
    kw = dict(token_ids=ids, model_id=MODEL, model_revision="r", layout=cfg.layout,
              world_size=world, dtype=cfg.dtype, policy=list(pol.signature()),
              extra={"chunk": 4 * world})
    key, fields = content_key(**kw), key_fields(**kw)

    def load():
        return load_or_none(store, key, cfg, model_id=MODEL, eviction=pol)

    def prefilled() -> ShardedKVCache:
        c = ShardedKVCache(cfg, eviction=pol)
        for i in range(cfg.num_layers):
            for lo in range(0, n, 4 * world):
                c.prefill_chunk(i, *(c.shard_chunk(x[None, lo:lo + 4 * world])
                                     for x in (Q, K, V)))
        c.compress()
        return c

    def save(c) -> None:
        save_entry(store, key, c, model_id=MODEL, meta={"tokens": n, "fields": fields})

    def on_rank0(fn) -> None:
        dist.barrier()
        if rank == 0:
            fn()
        dist.barrier()

    def damaged(how: str) -> None:
        """load_or_none is None on every rank, warns on rank 0, and the entry is gone."""
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert load() is None, how
        said = [str(w.message) for w in seen]
        assert rank != 0 or any(key in m and "removing it" in m for m in said), (how, said)
        on_rank0(lambda: (store.lookup(key) is None and not (root / key).exists())
                 or pytest.fail(f"{how}: the entry is still there"))

    assert load() is None  # a miss
    a = prefilled()
    save(a)
    b = load()
    assert b is not None
    for t in range(n, n + 4):  # the loaded cache decodes exactly as the saved one
        for i in range(cfg.num_layers):
            x = [y[None, t:t + 1] for y in (Q, K, V)]
            assert torch.equal(a.decode(i, *x), b.decode(i, *x)), (t, i)
    entry = [e for e in store.entries() if e.key == key] if rank == 0 else []
    assert rank != 0 or (entry[0].tokens == n and entry[0].fields["world_size"] == world)

    def flip() -> None:  # one byte in the middle of the last rank's first layer record
        rec = sorted((root / key / "cache").glob(f"gen-*/rank{world - 1:05d}/*/*.rec"))[0]
        data = bytearray(rec.read_bytes())
        data[len(data) // 2] ^= 0xFF
        rec.write_bytes(data)
    on_rank0(flip)
    damaged("a flipped byte")
    save(prefilled())
    on_rank0(lambda: next((root / key / "cache").glob("gen-*/rank00001.json")).unlink())
    damaged("a deleted shard file")
    save(prefilled())
    on_rank0(lambda: (root / key / "cache" / "MANIFEST.json").unlink())
    damaged("a deleted manifest")
    # a save that never committed (rank 0 died before commit) is a miss, untouched
    on_rank0(lambda: store.begin(key))
    a.save(store.path(key), model_id=MODEL)
    assert load() is None
    on_rank0(lambda: store.path(key).is_dir() or pytest.fail("the unfinished save went"))
    a.close()
    b.close()


@pytest.mark.parametrize("world", [2, 3])
def test_collective_hit_exact_decode_and_damaged_entries(tmp_path, world: int) -> None:
    spawn(_flow, world, str(tmp_path / "store"), timeout=240)


def _different_roots(rank: int, world: int, root_s: str) -> None:
    from ringmem.cache import CacheConfig
    cfg = CacheConfig(num_layers=1, q_heads=2, kv_heads=1, head_dim=4, capacity=8,
                      page_size=4, dtype=torch.float32)
    store = DocCacheStore(Path(root_s) / f"rank{rank}")
    with pytest.raises(ValueError, match="ranks use different store roots"):
        load_or_none(store, _key(1), cfg, model_id=MODEL)
    said = "key must be 64 lowercase hex" if rank == 1 else r"rank\(s\) \[1\] rejected"
    with pytest.raises(ValueError, match=said):  # a bad key on one rank: an error on both
        load_or_none(store, "abc" if rank == 1 else _key(1), cfg, model_id=MODEL)


def test_ranks_that_disagree_on_root_or_key_raise_on_every_rank(tmp_path) -> None:
    spawn(_different_roots, 2, str(tmp_path), timeout=120)
