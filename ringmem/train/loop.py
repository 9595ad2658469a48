"""One context-parallel training run: the mesh, the model under FSDP2, the step.

Mesh: (dp, cp). Each context-parallel group splits every row's tokens by the layout and
runs ring attention over the group; parameters are sharded with FSDP2 over the flattened
dp x cp mesh (every CP rank holds the same parameters, as torchtitan does). The loss is the
mean over every supervised token of the global batch: each rank backpropagates
world * sum(CE of its tokens) / (global token count) and FSDP averages the gradients over
the world (a divide factor of 1 would need PREMUL_SUM, which gloo lacks), so gradients
equal the single-process model's on the whole batch.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .config import TrainConfig
from .data import IGNORE, Plan, Row, batch, documents, pack

ATTN_NAME = "ringmem-train"


@dataclass
class Run:
    cfg: TrainConfig
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rows: list[Row]
    plan: Plan
    cp_group: Any
    dp_rank: int
    device: torch.device
    step: int = 0


def load_model(spec: str, seed: int) -> tuple[Any, Any]:
    """(model in train mode, tokenizer): bundled, a local checkpoint, or random:<config>."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..demo import models
    if spec.startswith("random:"):
        config = AutoConfig.from_pretrained(spec.split(":", 1)[1])
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tok = models.load_tokenizer()
        if config.vocab_size < len(tok):
            raise ValueError(f"model {spec}: vocab_size {config.vocab_size} is smaller than "
                             f"the tokenizer's {len(tok)}")
    else:
        model, tok = models.load(spec)
    return model.train(), tok


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def checkpoint_activations(model: Any) -> None:
    """Activation checkpointing (non-reentrant) through `activation_checkpointing_enable`
    where transformers has it (5.x: `gradient_checkpointing_enable` warns on every rank
    that it is deprecated), else the older name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build(cfg: TrainConfig, world: int) -> Run:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..integrations import hf
    dp, cp = cfg.mesh(world)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dp, cp), mesh_dim_names=("dp", "cp"))
    model, tok = load_model(cfg.model, cfg.seed)
    model.to(device)
    model.set_attn_implementation(hf.register(name=ATTN_NAME, group=mesh.get_group("cp"),
                                              layout=cfg.layout, schedule=cfg.schedule,
                                              ulysses=cfg.ulysses, backend=cfg.backend))
    if cfg.activation_checkpointing:
        checkpoint_activations(model)
    if cfg.compile:  # per layer, before FSDP wraps it (torchtitan's order)
        for layer in model.model.layers:
            layer.compile()
    flat = mesh["dp", "cp"]._flatten("dp_cp")
    for layer in model.model.layers:
        fully_shard(layer, mesh=flat)
    fully_shard(model, mesh=flat)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    rows = pack(documents(cfg.data, cfg.files(), tok, cfg.seed, cfg.max_documents),
                cfg.seq_len)
    return Run(cfg, model, optimizer, scheduler, rows,
               Plan(len(rows), cfg.batch, cfg.grad_accum, dp), mesh.get_group("cp"),
               mesh.get_local_rank("dp"), device)


def _local(run: Run, ids: Tensor, labels: Tensor,
           cus: list[tuple[int, ...]]) -> tuple[Tensor, Tensor, Tensor]:
    """This CP rank's (input ids, labels, position ids); pads (document layout) ignored."""
    from ..sharding import shard
    kw = dict(group=run.cp_group, layout=run.cfg.layout, cu_seqlens=cus)
    ids_l, pos = shard(ids, 1, return_position_ids=True, **kw)
    labels_l = shard(labels - IGNORE, 1, **kw) + IGNORE  # a pad's 0 becomes IGNORE
    return ids_l.to(run.device), labels_l.to(run.device), pos.to(run.device)


def backward(run: Run) -> tuple[float, float]:
    """Forward and backward of the step's global batch (gradients left in the parameters);
    returns (global mean loss, supervised tokens)."""
    cfg = run.cfg
    micro = [batch(run.rows, run.plan, run.step, m, run.dp_rank) for m in range(cfg.grad_accum)]
    local = [_local(run, *m) for m in micro]
    count = torch.tensor([float(sum(int((lab != IGNORE).sum()) for _, lab, _ in local))],
                         dtype=torch.float64)
    dist.all_reduce(count)  # supervised tokens of the whole global batch
    n = count.item()
    run.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    cast = (torch.autocast(run.device.type, dtype=torch.bfloat16)
            if cfg.dtype == "bfloat16" else nullcontext())
    for (ids, lab, pos), (_, _, cus) in zip(local, micro):
        # compiled layers read the documents off the position ids (a Python packing would
        # be a new constant, hence a recompile, every batch)
        docs = {} if cfg.compile else {"cu_seq_lens_q": cus}
        with cast:
            logits = run.model(input_ids=ids, position_ids=pos, use_cache=False,
                               **docs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), lab.flatten(), ignore_index=IGNORE, reduction="sum")
        (loss * (dist.get_world_size() / n)).backward()
        total += loss.detach().double().cpu()
    dist.all_reduce(total)
    return total.item() / n, n


def train_step(run: Run) -> dict[str, float]:
    """One optimizer step over grad_accum micro-steps; returns global loss and norms."""
    cfg = run.cfg
    loss, n = backward(run)
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                          cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    return {"step": run.step, "loss": loss, "grad_norm": float(norm), "lr": lr, "tokens": n}
