"""torchrun entry: context-parallel training of a causal LM on packed documents.

    torchrun --standalone --nproc-per-node 2 ringmem/launch/train.py \\
        --config configs/train_smoke.toml
    ringmem train --nproc 2 --config configs/train_smoke.toml        # the same

gloo on CPU, NCCL when CUDA is available. Prints a progress bar (step, loss, tokens/s, peak
memory), writes <out_dir>/log.jsonl, <out_dir>/loss.png and checkpoints
(<out_dir>/checkpoint, torch.distributed.checkpoint); `--resume` continues from the last one
exactly. The config is checked whole before any model or data is loaded.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ringmem.config import ArgumentParser
from ringmem.timeouts import exit_on_comm_error, init_process_group, resolve
from ringmem.train.config import TrainConfig, load


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, bool, int | None]:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML file (see configs/train_*.toml)")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--steps", type=int)
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--dp", type=int)
    p.add_argument("--out-dir", dest="out_dir")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint")
    p.add_argument("--stop-at", type=int, dest="stop_at",
                   help="checkpoint and stop at this step (the schedule still spans --steps)")
    p.add_argument("--timeout", type=float, help="seconds to wait for a peer (RINGMEM_TIMEOUT)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each decoder layer (needs layout = 'zigzag')")
    p.add_argument("--layout", choices=("document", "zigzag"))
    args = p.parse_args(argv)
    over = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "stop_at")}
    return load(args.config, **over), args.resume, args.stop_at


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def plot(log: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_title(log.parent.name)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def truncate_log(log: Path, step: int) -> None:
    """Keep the log's steps up to `step` (the checkpoint's), so a resumed run continues it
    without repeats: a run stopped after its last checkpoint logged steps it will redo.
    Atomic (a new file, then os.replace): a crash here leaves the old log whole."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by the crash
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line + "\n")
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, log)


def check_model(model: str) -> None:
    """A checkpoint directory needs config.json and tokenizer files; random:<dir> needs
    config.json (its tokenizer is the bundled one): one line here, not one per rank."""
    from ringmem.demo import models
    if model.startswith("random:"):
        where = model.split(":", 1)[1]
        if not (Path(where).expanduser() / "config.json").is_file():
            raise ValueError(f"model {model!r}: no config.json in {where!r}")
    elif model not in (models.BUNDLED, models.GEMMA3):
        models.check_tokenizer(model)


def check(argv: list[str] | None, world: int | None) -> tuple[TrainConfig, bool, int]:
    """(config, resume, stop_at): every check before a process group or model exists (also
    run by the console command before torchrun starts; world None: unknown, elastic)."""
    cfg, resume, stop_at = parse(argv)
    resolve(cfg.timeout)  # a malformed RINGMEM_TIMEOUT fails here, not in every rank
    stop_at = cfg.steps if stop_at is None else stop_at
    if not 1 <= stop_at <= cfg.steps:
        raise ValueError(f"--stop-at must be in [1, steps={cfg.steps}], got {stop_at}")
    if world is not None:
        cfg.mesh(world)
    check_model(cfg.model)
    ckpt = Path(cfg.out_dir) / "checkpoint"
    if resume and not ckpt.is_dir():
        raise ValueError(f"--resume: no checkpoint at {ckpt}")
    return cfg, resume, stop_at


def main(argv: list[str] | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg, resume, stop_at = check(argv, world)
        dp, cp = cfg.mesh(world)
    except ValueError as e:
        sys.exit(f"train: {e}")
    with exit_on_comm_error("train"):
        job(cfg, resume, stop_at, world, dp, cp)


def job(cfg: TrainConfig, resume: bool, stop_at: int, world: int, dp: int,
        cp: int) -> None:
    ckpt = Path(cfg.out_dir) / "checkpoint"
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group("nccl" if cuda else "gloo", timeout=cfg.timeout)
    from ringmem.train import loop, state
    rank = dist.get_rank()
    run = loop.build(cfg, world)
    if resume:
        state.load(run, ckpt)
    out = Path(cfg.out_dir)
    log = out / "log.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            truncate_log(log, run.step)
        else:
            log.write_text("")
        print(f"train: dp={dp} cp={cp} rows={len(run.rows)} x {cfg.seq_len} tokens, "
              f"from step {run.step}", flush=True)
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=stop_at, initial=run.step, desc="train")
    while run.step < stop_at:
        t0 = time.perf_counter()
        rec = loop.train_step(run)
        dt = time.perf_counter() - t0
        rec.update(step_s=dt, tokens_per_s=rec["tokens"] / dt,
                   peak_mib=peak_bytes(run.device) / 2**20)
        if rank == 0:
            with log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:,.0f}",
                            mem=f"{rec['peak_mib']:.0f}MiB")
            bar.update(1)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            state.save(run, ckpt)
    state.save(run, ckpt)
    if rank == 0:
        bar.close()
        plot(log, out / "loss.png")
        print(f"train: {run.step} steps; log {log}, plot {out / 'loss.png'}, checkpoint "
              f"{ckpt}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
