"""Context-parallel training is exact: CP=2, CP=3, CP=4 and DP=2 x CP=2 give CP=1's loss and
gradients at step 1 and its loss curve over 20 steps; a stopped and resumed run ends with
the parameters of an uninterrupted one, bit for bit; bad configs stop before any loading."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringmem.testing import spawn
from ringmem.train.config import TrainConfig, from_dict

from _demo import require_demo

ROOT = Path(__file__).resolve().parents[1]
TINY = f"random:{ROOT / 'configs' / 'models' / 'llama_tiny'}"
BASE = dict(model=TINY, seq_len=256, steps=20, warmup=2, max_documents=48, lr=3e-3,
            min_lr=3e-4)


def _grads(rank: int, world: int, cfg: TrainConfig, out: str, steps: int) -> None:
    from ringmem.train import loop
    run = loop.build(cfg, world)
    loss, _ = loop.backward(run)
    grads = {n: p.grad.full_tensor().clone() for n, p in run.model.named_parameters()}
    losses = [loss]
    for _ in range(steps):
        losses.append(loop.train_step(run)["loss"])
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "curve": losses[1:]}, out)


def _run(tmp_path: Path, name: str, world: int, steps: int = 0, **over) -> dict:
    cfg = from_dict(TrainConfig, {**BASE, **over})
    out = str(tmp_path / f"{name}.pt")
    spawn(_grads, world, cfg, out, steps, timeout=600)
    return torch.load(out)


def _max_err(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.slow
def test_context_parallel_training_is_exact(tmp_path) -> None:
    require_demo()  # the tokenizer and the KJV text
    ref = _run(tmp_path, "cp1", 1, steps=20, batch=2)
    # the fp32 noise of the same math: CP=1 computed by another backend
    alt = _run(tmp_path, "cp1_torch", 1, batch=2, backend="torch")
    noise = _max_err(alt["grads"], ref["grads"])
    bound = 8 * noise + 1e-6
    for name, world, over in (("cp2", 2, dict(batch=2)), ("cp3", 3, dict(batch=2)),
                              ("cp4", 4, dict(batch=2)),
                              ("dp2cp2", 4, dict(dp=2, batch=1)),
                              ("cp2_accum", 2, dict(batch=1, grad_accum=2)),
                              ("cp2_ckpt", 2, dict(batch=2, activation_checkpointing=True)),
                              ("cp2_zigzag", 2, dict(batch=2, layout="zigzag"))):
        got = _run(tmp_path, name, world, steps=20 if name == "cp2" else 0, **over)
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (name, got["loss"])
        err = _max_err(got["grads"], ref["grads"])
        assert err <= bound, f"{name}: gradient err {err:.3e} > {bound:.3e} (noise {noise:.3e})"
        if got["curve"]:  # 20 steps of AdamW: the curves agree to 1e-4 relative
            for i, (a, b) in enumerate(zip(got["curve"], ref["curve"])):
                assert abs(a - b) <= 1e-4 * abs(b), (name, i, a, b)
    assert ref["curve"][-1] < ref["curve"][0] - 0.5  # and it learns
    # bf16 autocast: the same step within bf16's rounding (loss to 1%, gradient norm to 5%)
    half = _run(tmp_path, "cp2_bf16", 2, batch=2, dtype="bfloat16")
    assert abs(half["loss"] - ref["loss"]) <= 1e-2 * abs(ref["loss"])
    norm = lambda g: sum(float(t.double().square().sum()) for t in g.values()) ** 0.5  # noqa
    assert abs(norm(half["grads"]) - norm(ref["grads"])) <= 0.05 * norm(ref["grads"])


def _launch(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(ROOT / "ringmem" / "launch" / "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _params(ckpt: Path, out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ringmem.generations import current
    dcp_to_torch_save(str(current(ckpt)), str(out))  # the generation the manifest names
    return torch.load(out, weights_only=False)["model"]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path) -> None:
    require_demo()
    common = ["--config", "configs/train_smoke.toml"]
    full = _launch(*common, "--steps", "6", "--out-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    part = _launch(*common, "--steps", "6", "--stop-at", "3", "--out-dir", str(tmp_path / "part"))
    assert part.returncode == 0, part.stderr[-3000:]
    _crashed_after_logging(tmp_path / "part" / "log.jsonl", 5)
    again = _launch(*common, "--steps", "6", "--out-dir", str(tmp_path / "part"), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    a = _params(tmp_path / "full" / "checkpoint", tmp_path / "a.pt")
    b = _params(tmp_path / "part" / "checkpoint", tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log_steps(tmp_path / "part" / "log.jsonl") == list(range(1, 7))  # each once
    assert (tmp_path / "part" / "loss.png").is_file()


def _crashed_after_logging(log: Path, last: int) -> None:
    """The log of a run that logged steps past its checkpoint, up to `last`, and died
    writing the next line (what --resume finds after a crash)."""
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    extra = [{**rows[-1], "step": s} for s in range(rows[-1]["step"] + 1, last + 1)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows + extra) + '{"step": ')


def _log_steps(log: Path) -> list[int]:
    return [json.loads(x)["step"] for x in log.read_text().splitlines()]


def test_resume_truncates_the_log_to_the_checkpoint(tmp_path) -> None:
    """The launcher's log cut (the resume test above runs it end to end)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_launcher",
                                                  ROOT / "ringmem" / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    _crashed_after_logging(log, 5)
    module.truncate_log(log, 3)
    assert _log_steps(log) == [1, 2, 3] and not (tmp_path / "log.jsonl.tmp").exists()
    module.truncate_log(tmp_path / "absent.jsonl", 3)  # no log yet: nothing to cut


@pytest.mark.parametrize("args, message", [
    (["--dp", "3"], "dp=3 does not divide the world size 2"),
    (["--seq-len", "250", "--config", "configs/train_smoke.toml"], None),
    (["--data", "/nonexistent.txt"], "data file(s) not found: ['/nonexistent.txt']"),
    (["--model", "NOTOK"], "has no tokenizer files (one of: tokenizer.json"),
    (["--model", "random:/nonexistent"], "no config.json in '/nonexistent'"),
    (["--config", "DIR"], "is a directory, not a TOML file"),
])
def test_bad_train_config_stops_before_loading(args: list[str], message: str | None,
                                               tmp_path) -> None:
    if message is None:  # zigzag needs a multiple of 2 * cp
        args = ["--config", str(_zigzag(tmp_path)), "--seq-len", "250"]
        message = "seq_len=250 is not a multiple of 4"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # no tokenizer files
    args = [{"NOTOK": str(tmp_path / "model"), "DIR": str(tmp_path)}.get(a, a) for a in args]
    res = _launch("--model", TINY, *args)
    lines = [x for x in res.stderr.splitlines() if x.startswith("train: ")]
    assert res.returncode != 0 and lines and message in lines[0], res.stderr[-2000:]
    assert 'ringmem/launch/train.py", line' not in res.stderr  # one line, no traceback of ours


def _zigzag(tmp_path: Path) -> Path:
    p = tmp_path / "z.toml"
    p.write_text('layout = "zigzag"\n')
    return p


def _steps(rank: int, world: int, cfgs: dict[str, TrainConfig], out: str) -> None:
    """Step 1's loss and gradients of each config (one process each rank: the tokenizer
    loads once); the registered attention must carry each config's options."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ringmem.train import loop
    res = {}
    for name, cfg in cfgs.items():
        run = loop.build(cfg, world)
        attn = ALL_ATTENTION_FUNCTIONS[loop.ATTN_NAME]
        assert (attn.schedule, attn.ulysses) == (cfg.schedule, cfg.ulysses), (name, vars(attn))
        torch._dynamo.utils.counters.clear()
        loss, _ = loop.backward(run)
        res[name] = {"loss": loss, "grads": {n: p.grad.full_tensor().clone()
                                             for n, p in run.model.named_parameters()},
                     "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                     "breaks": dict(torch._dynamo.utils.counters["graph_break"])}
    if rank == 0:
        torch.save(res, out)


def test_ulysses_training_step_equals_ring(tmp_path) -> None:
    """CP=2 as one Ulysses group (all-to-all, heads split) gives the ring's loss and
    gradients; the bound is the fp32 noise of the ring step on another block backend."""
    require_demo()
    over = dict(model=TINY, seq_len=128, batch=1, max_documents=8)
    cfgs = {name: from_dict(TrainConfig, {**over, **extra}) for name, extra in (
        ("ring", {}), ("ring_torch", dict(backend="torch")),
        ("ulysses", dict(ulysses=2, schedule="kv")))}
    out = str(tmp_path / "steps.pt")
    spawn(_steps, 2, cfgs, out, timeout=300)
    res = torch.load(out)
    ref, alt, got = res["ring"], res["ring_torch"], res["ulysses"]
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (got["loss"], ref["loss"])
    bound = 8 * _max_err(alt["grads"], ref["grads"]) + 1e-6
    err = _max_err(got["grads"], ref["grads"])
    assert err <= bound, f"ulysses=2: gradient err {err:.3e} > {bound:.3e}"


def test_activation_checkpointing_without_deprecation_warning() -> None:
    """transformers 5.x deprecates gradient_checkpointing_enable (a warning per rank): the
    trainer uses activation_checkpointing_enable where it exists, the old name elsewhere."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    from ringmem.train.loop import checkpoint_activations
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(ROOT / "configs" / "models" / "llama_tiny"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint_activations(model)
    assert not [w for w in caught if "deprecated" in str(w.message)], \
        [str(w.message) for w in caught]
    assert model.is_gradient_checkpointing

    class Old:  # transformers before activation_checkpointing_enable
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs
    old = Old()
    checkpoint_activations(old)
    assert old.kwargs == {"use_reentrant": False}


def test_train_config_files_load() -> None:
    from ringmem.train.config import load
    for path in sorted((ROOT / "configs").glob("train_*.toml")):
        if "megatron" not in path.name:
            assert isinstance(load(str(path)), TrainConfig), path


@pytest.mark.parametrize("world", [2, 3])
def test_compiled_training_step_equals_eager(tmp_path, world) -> None:
    """compile = true (each decoder layer through inductor, ring attention a custom op that
    reads the packed documents off the position ids) gives the eager step's loss and
    gradients; the bound is the fp32 noise of the eager step on another block backend."""
    require_demo()
    over = dict(model=TINY, seq_len=96, batch=1, max_documents=8, layout="zigzag",
                schedule="kv")
    cfgs = {name: from_dict(TrainConfig, {**over, **extra}) for name, extra in (
        ("eager", {}), ("eager_torch", dict(backend="torch")), ("compiled", dict(compile=True)),
        # Ulysses over the whole CP group where it divides the tiny model's 4 heads
        *([("compiled_ulysses", dict(compile=True, ulysses=world))] if world == 2 else []))}
    out = str(tmp_path / "steps.pt")
    spawn(_steps, world, cfgs, out, timeout=600)
    res = torch.load(out)
    ref, alt = res["eager"], res["eager_torch"]
    bound = 8 * _max_err(alt["grads"], ref["grads"]) + 1e-6
    assert ref["graphs"] == 0
    for name in [n for n in res if n.startswith("compiled")]:
        got = res[name]
        assert got["graphs"] >= 1, name  # it did compile ...
        assert got["breaks"] == {}, (name, got["breaks"])  # ... every layer whole
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (name, got["loss"])
        err = _max_err(got["grads"], ref["grads"])
        assert err <= bound, f"{name}: gradient err {err:.3e} > {bound:.3e}"


def test_train_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        from_dict(TrainConfig, {"sequence": 4})
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16'"):
        from_dict(TrainConfig, {"dtype": "float16"})
    with pytest.raises(ValueError, match="config asks for world_size=4, torchrun started 2"):
        from_dict(TrainConfig, {"world_size": 4}).mesh(2)
    assert dataclasses.asdict(from_dict(TrainConfig, {"dp": 2})).get("dp") == 2
    for bad in (0, -1, "two"):
        with pytest.raises(ValueError, match=f"ulysses must be an int >= 1 or 'auto', got "
                                             f"{bad!r}"):
            from_dict(TrainConfig, {"ulysses": bad})
    for bad in (True, 1.5):  # the TOML type check
        with pytest.raises(ValueError, match=f"key 'ulysses' must be int | str, got {bad}"):
            from_dict(TrainConfig, {"ulysses": bad})
    with pytest.raises(ValueError, match="schedule must be one of .*got 'ring'"):
        from_dict(TrainConfig, {"schedule": "ring"})
    with pytest.raises(ValueError, match=r"ulysses=2 does not divide the context-parallel "
                                         r"degree cp=3 \(world 6 // dp 2\)"):
        from_dict(TrainConfig, {"ulysses": 2, "dp": 2}).mesh(6)
    assert from_dict(TrainConfig, {"ulysses": 2, "dp": 2}).mesh(8) == (2, 4)
    assert from_dict(TrainConfig, {"ulysses": "auto", "schedule": "allgather"}).mesh(3) == (1, 3)
    with pytest.raises(ValueError, match="compile = true needs layout = 'zigzag' .*got "
                                         "layout='document'"):
        from_dict(TrainConfig, {"compile": True})


@pytest.mark.slow
def test_smollm2_context_parallel_matches_cp1(tmp_path) -> None:
    """The real SmolLM2-135M: CP=2 gives CP=1's loss and gradients at step 1, and the same
    losses over 2 more steps (fp32 noise bound from a second CP=1 backend)."""
    require_demo()
    over = dict(model="smollm2-135m", seq_len=256, batch=1, max_documents=8, lr=1e-4,
                min_lr=1e-5)
    ref = _run(tmp_path, "s1", 1, steps=2, **over)
    alt = _run(tmp_path, "s1t", 1, backend="torch", **over)
    got = _run(tmp_path, "s2", 2, steps=2, **over)
    bound = 8 * _max_err(alt["grads"], ref["grads"]) + 1e-6
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    assert _max_err(got["grads"], ref["grads"]) <= bound
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got["curve"], ref["curve"]))


def test_cli_train_command() -> None:
    from ringmem.cli import command
    cmd = command("train", 2, ["--config", "c.toml", "--nnodes", "2", "--rdzv-endpoint=h:1"])
    assert "--standalone" not in cmd and "--nnodes=2" in cmd and "--rdzv-endpoint=h:1" in cmd
    assert cmd[-3:] == ["ringmem.launch.train", "--config", "c.toml"]
    cmd = command("train", 4, ["--engine", "megatron", "--config", "m.toml"])
    assert "--standalone" in cmd and cmd[-3:] == ["ringmem.launch.train_megatron", "--config",
                                                  "m.toml"]
    with pytest.raises(ValueError, match="--engine must be one of"):
        command("train", 2, ["--engine", "deepspeed"])
