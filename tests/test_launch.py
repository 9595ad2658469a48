"""The torchrun launcher runs end to end from a config; bad configs fail before any work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ringmem.cli import command
from ringmem.config import InferConfig, PrefillConfig, from_dict, load_config

from _demo import require_demo

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(ROOT / "ringmem" / "launch" / "prefill.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_prefill_launcher_runs() -> None:
    res = _torchrun("--config", "configs/prefill_smoke.toml")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [l for l in res.stdout.splitlines() if l.startswith("[rank")]
    assert len(lines) == 2 and all("finite=True" in l for l in lines), res.stdout


def test_launcher_rejects_world_size_mismatch() -> None:
    res = _torchrun("--config", "configs/prefill_cpu.toml", "--seq-len", "64", nproc=1)
    assert res.returncode != 0
    assert "config asks for world_size=2, torchrun started 1" in res.stderr


def test_prefill_checks_ulysses_against_the_world(tmp_path) -> None:
    import importlib.util
    # by path, like torchrun runs it (an installed ringmem.launch may be another checkout's)
    spec = importlib.util.spec_from_file_location("prefill_launcher",
                                                  ROOT / "ringmem" / "launch" / "prefill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check = module.check
    path = tmp_path / "u.toml"
    path.write_text('ulysses = 4\nseq_len = 64\n')
    with pytest.raises(ValueError, match="ulysses=4 does not divide the world size 2"):
        check(["--config", str(path)], 2)
    assert check(["--config", str(path)], 8).ulysses == 4


def test_config_files_load() -> None:
    for path in sorted((ROOT / "configs").glob("prefill_*.toml")):
        assert isinstance(load_config(PrefillConfig, path), PrefillConfig)
    for path in sorted((ROOT / "configs").glob("infer_*.toml")):
        assert isinstance(load_config(InferConfig, path), InferConfig)


def _ringmem(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ringmem.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_root_does_not_shadow_pypi_kernels() -> None:
    """From the repository root (cwd first on sys.path, as `python -m` and torchrun put it),
    transformers' hub-kernel integration imports the PyPI `kernels`, not a folder of ours."""
    require_demo("kernels")
    code = ("import sys, kernels, transformers.integrations.hub_kernels; "
            "assert sys.path[0] in ('', '.') or sys.path[0] == __import__('os').getcwd(); "
            "print(kernels.__file__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not res.stdout.strip().startswith(str(ROOT / "kernels")), res.stdout


@pytest.mark.slow
def test_infer_demo_runs_end_to_end() -> None:
    """From the repository root, as README runs it (also proves no root folder shadows the
    PyPI packages transformers imports at start-up)."""
    require_demo()
    res = _ringmem("infer", "--nproc", "2", "--config", "configs/infer_smoke.toml")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert sum(l.startswith("[rank") for l in out.splitlines()) == 2, out
    assert "time to first token" in out and "cache: tokens per rank" in out, out
    assert ": correct" in out, out  # the planted pass key was answered


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/infer_smoke.toml"], "config asks for world_size=2, torchrun started 1"),
    (["--model", "/nonexistent/model"], "model path '/nonexistent/model' is not a transformers"),
    (["--document", "/nonexistent.txt"], "document '/nonexistent.txt' does not exist"),
    (["--haystack-tokens", "9000"], "haystack_tokens=9000 exceeds max_context=8192"),
    (["--max-new-tokens", "100000"], "max_new_tokens=100000 exceeds max_context=8192"),
    (["--document", "DIR"], "is not a file"),
    (["--document", "EMPTY"], "is empty"),
    (["--document", "BINARY"], "is not UTF-8 text"),
    (["--config", "BINARY"], "is not a TOML file: not UTF-8 text (byte 0)"),
    (["--config", "DIR"], "is a directory, not a TOML file"),
    (["--model", "NOTOK"], "has no tokenizer files (one of: tokenizer.json"),
    (["--model", "BADTOK", "--document", "DOC"], "its tokenizer does not load: "),
])
def test_infer_rejects_bad_input_before_loading(args: list[str], message: str,
                                               tmp_path) -> None:
    files = {"DIR": tmp_path, "EMPTY": tmp_path / "e.txt", "BINARY": tmp_path / "b.bin",
             "NOTOK": tmp_path / "model", "BADTOK": tmp_path / "bad", "DOC": tmp_path / "d.txt"}
    files["EMPTY"].write_text("  \n")
    files["DOC"].write_text("hello")
    files["BADTOK"].mkdir()
    (files["BADTOK"] / "config.json").write_text("{}")
    (files["BADTOK"] / "tokenizer.json").write_text("not JSON")  # a damaged tokenizer
    files["BINARY"].write_bytes(bytes([0xff, 0xfe, 0x00, 0x81]) * 10)
    files["NOTOK"].mkdir()
    (files["NOTOK"] / "config.json").write_text("{}")  # weights' config, no tokenizer
    args = [str(files.get(a, a)) for a in args]
    res = _ringmem("infer", "--nproc", "1", *args)
    assert res.returncode != 0 and "infer: " in res.stderr and message in res.stderr, \
        res.stderr[-2000:]
    if str(files["NOTOK"]) in args:  # names the directory
        assert repr(str(files["NOTOK"])) in res.stderr, res.stderr[-2000:]
    assert "worker(s) failed" not in res.stderr  # the console's check, before torchrun
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
    assert "Loading weights" not in res.stderr


def test_infer_console_counts_the_prompt_as_the_workers_do(tmp_path) -> None:
    """A document that fits max_context alone but not with the question and the chat
    template is refused by the console's check, before torchrun (the workers used to)."""
    require_demo()
    from ringmem.demo import models
    tok = models.load_tokenizer()
    doc = tmp_path / "doc.txt"
    doc.write_text("In the beginning God created the heaven and the earth. " * 5)
    alone = len(tok(doc.read_text())["input_ids"])
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"max_context = {alone + 2}\nmax_new_tokens = 1\nhaystack_tokens = 1\n")
    res = _ringmem("infer", "--nproc", "1", "--config", str(cfg), "--document", str(doc))
    assert res.returncode != 0, res.stdout[-2000:]
    assert f"longer than max_context={alone + 2}" in res.stderr, res.stderr[-2000:]
    assert "worker(s) failed" not in res.stderr, res.stderr[-2000:]  # before torchrun


def _prefill_check():
    import importlib.util
    # by path, like torchrun runs it (an installed ringmem.launch may be another checkout's)
    spec = importlib.util.spec_from_file_location("prefill_launcher",
                                                  ROOT / "ringmem" / "launch" / "prefill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefill_refuses_a_seq_len_beyond_memory() -> None:
    """seq_len = 2**42 is one line up front, not a traceback after a 256 TiB allocation."""
    module = _prefill_check()
    args = ["--config", "configs/prefill_smoke.toml", "--seq-len", str(2 ** 42)]
    with pytest.raises(ValueError, match=r"seq_len=4398046511104 is too long for this "
                                         r"machine: .* = 4\.0 PiB\) before sharding"):
        module.check(args, 2)
    cfg = module.check(["--config", "configs/prefill_smoke.toml", "--seq-len", "1024"], 2)
    module.check_memory(cfg, memory=2 ** 30)  # 1024 tokens: well under 1 GiB
    with pytest.raises(ValueError, match="more than its 1.0 KiB of memory"):
        module.check_memory(cfg, memory=1024)
    res = _ringmem("prefill", "--nproc", "2", *args)
    assert res.returncode == 1 and res.stderr.startswith("prefill: seq_len=4398046511104"), \
        res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]


@pytest.mark.slow
def test_infer_refuses_a_document_longer_than_max_context(tmp_path) -> None:
    require_demo()
    doc = tmp_path / "long.txt"
    doc.write_text("and it came to pass " * 2000)
    res = _ringmem("infer", "--nproc", "1", "--document", str(doc))
    assert res.returncode != 0, res.stdout[-2000:]
    assert "longer than max_context=8192" in res.stderr, res.stderr[-2000:]
    assert "Loading weights" not in res.stderr  # refused before the model loads


def test_cli_command_line() -> None:
    cmd = command("infer", 3, ["--seed", "4"])
    assert cmd[-5:] == ["--nproc-per-node=3", "-m", "ringmem.launch.infer", "--seed", "4"]
    with pytest.raises(ValueError, match="--nproc must be >= 1, got 0"):
        command("infer", 0, [])


@pytest.mark.parametrize("data,pattern", [
    ({"seq_len": 8, "colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"seq_len": "8"}, "key 'seq_len' must be <class 'int'>, got '8'"),
    ({"causal": 1}, "key 'causal' must be <class 'bool'>, got 1"),
    ({"heads": 6, "kv_heads": 4}, "heads=6 must be a multiple of kv_heads=4"),
    ({"layout": "ring"}, "layout must be one of"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"ulysses": 0}, "ulysses must be an int >= 1 or 'auto', got 0"),
    ({"ulysses": 3}, r"ulysses=3 must divide heads=8"),
    ({"ulysses": True}, r"key 'ulysses' must be int \| str, got True"),
    ({"schedule": "ring"}, r"schedule must be one of \('auto', 'kv', 'q', 'allgather'\)"),
])
def test_bad_config(data: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        from_dict(PrefillConfig, data, "test.toml")


@pytest.mark.parametrize("data,pattern", [
    ({"haystack_tokens": 100, "colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"passkey_depth": 1.5}, r"passkey_depth must be in \[0, 1\], got 1.5"),
    ({"chunk_size": 0}, "chunk_size must be >= 1, got 0"),
    ({"model": ""}, "model must be"),
    ({"world_size": 0}, "world_size must be >= 1, got 0"),
    ({"eviction": "lru"}, "eviction must be one of"),
    ({"eviction": "snapkv", "budget": 1.5}, r"budget must be in \(0, 1\], got 1.5"),
    ({"allocation": "pyramid"}, "allocation must be one of"),
    ({"snapkv_kernel": 4}, "snapkv_kernel must be a positive odd int, got 4"),
    ({"eviction": "kvzip", "compress": "question"}, "kvzip.*needs compress"),
])
def test_bad_infer_config(data: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        from_dict(InferConfig, data, "test.toml")


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config(PrefillConfig, tmp_path / "nope.toml")
    with pytest.raises(ValueError, match=f"config file '{tmp_path}' is a directory"):
        load_config(PrefillConfig, tmp_path)
    (tmp_path / "b.toml").write_bytes(b"seq_len = 8\n\x81\x00")
    with pytest.raises(ValueError, match=r"'.*b.toml' is not a TOML file: not UTF-8 text "
                                         r"\(byte 12\)"):
        load_config(PrefillConfig, tmp_path / "b.toml")


@pytest.mark.slow
def test_infer_jobs_file_resumes_and_reuses_document_caches(tmp_path) -> None:
    """`ringmem infer --jobs`: two documents (one asked two questions from one prefill), a
    bad line reported and skipped; a rerun answers nothing twice; with --doc-cache the
    second run finds each document's cache (a hit) and answers exactly as the prefill did."""
    require_demo()
    from ringmem.demo import haystack
    doc = tmp_path / "a.txt"
    doc.write_text(" ".join(haystack.kjv_verses()[:12]))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(x) for x in [
        {"id": "a", "document": "a.txt", "questions": ["Who created the heaven?",
                                                       "What was upon the face of the deep?"]},
        {"id": "b", "text": "The pass key is 4242. Remember it.",
         "questions": ["What is the pass key?"], "options": {"max_new_tokens": 6}},
        {"id": "c", "questions": ["no document"]},
    ]) + "\n")
    out, store = tmp_path / "answers.jsonl", tmp_path / "store"

    def args(output):
        return ["infer", "--nproc", "2", "--jobs", str(jobs), "--output", str(output),
                "--max-new-tokens", "8", "--chunk-size", "64", "--page-size", "32",
                "--doc-cache", "--doc-cache-dir", str(store)]
    res = _ringmem(*args(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "line 3" in res.stderr, res.stderr[-2000:]
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["id"], r["question_index"]) for r in first) == [("a", 0), ("a", 1),
                                                                     ("b", 0)], first
    assert all(r["doc_cache"] == "miss" for r in first), first
    assert {r["batch"] for r in first if r["id"] == "a"} == {2}  # one prefill, one batch
    res = _ringmem(*args(out))  # everything answered: nothing is asked again
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 3
    again = tmp_path / "again.jsonl"
    res = _ringmem(*args(again))
    assert res.returncode == 0, res.stderr[-3000:]
    second = [json.loads(x) for x in again.read_text().splitlines()]
    assert all(r["doc_cache"] == "hit" for r in second), second
    key = lambda r: (r["id"], r["question_index"])  # noqa: E731
    assert [r["answer"] for r in sorted(first, key=key)] == \
        [r["answer"] for r in sorted(second, key=key)]
