"""torchrun entry: train a small megatron-core GPTModel whose attention is ringmem's ring.

    torchrun --standalone --nproc-per-node 2 ringmem/launch/train_megatron.py \\
        --config configs/train_megatron_tiny.toml

Mesh: tensor and pipeline parallel 1, data parallel `dp`, context parallel world // dp (the
ring runs over each CP group). gloo on CPU, NCCL when CUDA is available. Synthetic token
data; `packed = true` feeds THD batches (documents packed in one row, `packed_seq_params`).
Prints the loss of every step. Needs `pip install --no-deps megatron-core==0.16.1`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from ringmem.backends import BACKENDS
from ringmem.config import ArgumentParser, check_timeout, check_ulysses, load_config
from ringmem.options import CHOICES
from ringmem.timeouts import exit_on_comm_error, init_process_group, resolve

DATA = ("pattern", "random")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainMegatronConfig:
    """A few training steps of a tiny GPTModel with context parallelism (train_megatron.py)."""
    seq_len: int = 256
    """Tokens of one sample (packed: real tokens of one row of documents, each document then
    padded to a multiple of 2 * cp for the CP split), split over the CP ranks."""
    batch: int = 2
    """Samples per data-parallel rank per step (packed: rows, concatenated into one THD row)."""
    packed: bool = False
    """Feed packed documents (THD, packed_seq_params) instead of whole samples."""
    docs: int = 3
    """Documents per packed row (random lengths, each padded to a multiple of 2 * cp)."""
    data: str = "pattern"
    """"pattern": arithmetic runs of tokens (learnable: the loss falls); "random": uniform."""
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    """Key/value heads (GQA when fewer than `heads`)."""
    vocab: int = 128
    steps: int = 10
    lr: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 0.01
    dp: int = 1
    """Data-parallel degree; the context-parallel degree is the rest of the world."""
    cp: int | None = None
    """Context-parallel degree; None: world size // dp. dp * cp must be the world size."""
    dtype: str = "float32"
    """Parameters and activations: float32 or bfloat16."""
    schedule: str = "auto"
    """ringmem schedule of the ring ("auto", "kv", "q", "allgather")."""
    ulysses: int | str = 1
    """Ulysses degree inside each CP group (1: ring only): divides cp and heads; or "auto"."""
    backend: str = "auto"
    """ringmem block backend."""
    world_size: int | None = None
    """If set, the job refuses to start on any other number of ranks."""
    seed: int = 0
    timeout: float | None = None
    """Seconds any rank waits for a peer before failing; unset: RINGMEM_TIMEOUT, else 300."""

    def __post_init__(self) -> None:
        check_timeout(self)
        for name in ("seq_len", "batch", "docs", "layers", "hidden", "heads", "kv_heads",
                     "vocab", "steps", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cp is not None and self.cp < 1:
            raise ValueError(f"cp must be >= 1 or unset, got {self.cp}")
        if self.heads % self.kv_heads or self.hidden % self.heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads="
                             f"{self.kv_heads} and divide hidden={self.hidden}")
        for name, allowed in (("data", DATA), ("dtype", DTYPES), ("schedule", CHOICES),
                              ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if check_ulysses(self.ulysses) != "auto" and self.heads % self.ulysses:
            raise ValueError(f"ulysses={self.ulysses} must divide heads={self.heads}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, "
                             f"{self.weight_decay}")


def mesh(cfg: TrainMegatronConfig, world: int) -> tuple[int, int]:
    """(dp, cp) for `world` ranks, or ValueError: checked before anything is built."""
    if cfg.world_size is not None and cfg.world_size != world:
        raise ValueError(f"config asks for world_size={cfg.world_size}, torchrun started {world}")
    cp = cfg.cp if cfg.cp is not None else world // cfg.dp
    if cfg.dp * cp != world:
        raise ValueError(f"mesh dp={cfg.dp} x cp={cp} x tp=1 x pp=1 = {cfg.dp * cp} ranks, "
                         f"but torchrun started {world}")
    if cfg.ulysses != "auto" and cp % cfg.ulysses:
        raise ValueError(f"ulysses={cfg.ulysses} does not divide the context-parallel degree "
                         f"cp={cp}")
    chunk = 2 * cp if cp > 1 else 1
    if not cfg.packed and cfg.seq_len % chunk:  # packed documents are padded instead
        raise ValueError(f"seq_len={cfg.seq_len} must be divisible by 2*cp={chunk} (Megatron "
                         f"splits every sequence into 2*cp chunks)")
    if cfg.packed and cfg.docs > cfg.seq_len:
        raise ValueError(f"docs={cfg.docs} documents of at least one token each do not fit "
                         f"in seq_len={cfg.seq_len}")
    return cfg.dp, cp


def parse(argv: list[str] | None = None) -> TrainMegatronConfig:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="TOML file (see configs/)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--dp", type=int)
    p.add_argument("--backend")
    p.add_argument("--timeout", type=float, help="seconds to wait for a peer (RINGMEM_TIMEOUT)")
    args = p.parse_args(argv)
    over = {k: v for k, v in vars(args).items() if k != "config"}
    return load_config(TrainMegatronConfig, args.config, **over)


def check(argv: list[str] | None, world: int | None) -> TrainMegatronConfig:
    """The config, the mesh and megatron-core's presence, before any process group (also
    run by the console command before torchrun starts; world None: unknown, elastic)."""
    cfg = parse(argv)
    resolve(cfg.timeout)  # a malformed RINGMEM_TIMEOUT fails here, not in every rank
    if world is not None:
        mesh(cfg, world)
    if importlib.util.find_spec("megatron") is None:
        raise ValueError("megatron-core is not installed "
                         "(pip install --no-deps megatron-core==0.16.1)")
    return cfg


def _row(cfg: TrainMegatronConfig, g: torch.Generator, n: int) -> torch.Tensor:
    """n + 1 tokens: an arithmetic run mod vocab (start and stride random) or uniform."""
    if cfg.data == "random":
        return torch.randint(0, cfg.vocab, (n + 1,), generator=g)
    start, stride = (int(x) for x in torch.randint(0, cfg.vocab, (2,), generator=g))
    return (start + (stride % 7 + 1) * torch.arange(n + 1)) % cfg.vocab


def _doc_lengths(cfg: TrainMegatronConfig, g: torch.Generator) -> list[int]:
    """`docs` real lengths (>= 1 token each) summing to seq_len."""
    cuts = sorted(torch.randperm(cfg.seq_len - 1, generator=g)[:cfg.docs - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, cfg.seq_len])]


def documents(cfg: TrainMegatronConfig, step: int, dp_rank: int) -> list[list[torch.Tensor]]:
    """The data of `step` on data-parallel rank `dp_rank`: per row, its documents (n + 1
    tokens each: inputs and shifted labels). A function of (seed, step, dp_rank) alone,
    so runs at any CP degree train on the same tokens (the CP split only pads them)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + dp_rank)
    if not cfg.packed:
        return [[_row(cfg, g, cfg.seq_len)] for _ in range(cfg.batch)]
    return [[_row(cfg, g, n) for n in _doc_lengths(cfg, g)] for _ in range(cfg.batch)]


def global_batch(cfg: TrainMegatronConfig, step: int, dp_rank: int,
                 cp: int) -> tuple[dict[str, torch.Tensor], list[int] | None, list[int] | None]:
    """This data-parallel rank's batch of `step` before the CP split, and for packed data
    the real and padded document offsets (flash-attn cu_seqlens) of the THD row. Packed
    documents are padded to multiples of 2 * cp (the THD split's chunks); pads are masked
    out of the loss, so the tokens trained on do not depend on cp."""
    rows = documents(cfg, step, dp_rank)
    if not cfg.packed:
        t = torch.stack([docs[0] for docs in rows])
        return {"tokens": t[:, :-1], "labels": t[:, 1:],
                "loss_mask": torch.ones(cfg.batch, cfg.seq_len),
                "position_ids": torch.arange(cfg.seq_len).repeat(cfg.batch, 1)}, None, None
    chunk = 2 * cp if cp > 1 else 1
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("tokens", "labels", "loss_mask",
                                                            "position_ids")}
    real, padded = [0], [0]
    for t in (doc for docs in rows for doc in docs):
        n = len(t) - 1  # real tokens
        size = -(-n // chunk) * chunk
        pad = torch.zeros(size - n, dtype=torch.long)
        parts["tokens"].append(torch.cat([t[:-1], pad]))
        parts["labels"].append(torch.cat([t[1:], pad]))
        parts["loss_mask"].append(torch.cat([torch.ones(n), torch.zeros(size - n)]))
        parts["position_ids"].append(torch.arange(size))
        real.append(real[-1] + n)
        padded.append(padded[-1] + size)
    return {k: torch.cat(v)[None] for k, v in parts.items()}, real, padded


def local_batch(cfg: TrainMegatronConfig, step: int, device: torch.device) -> tuple[dict, Any]:
    """This rank's share of the step's batch (Megatron's CP split) and its packed_seq_params."""
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.utils import get_batch_on_this_cp_rank

    import ringmem

    cp_group = parallel_state.get_context_parallel_group()
    cp = cp_group.size()
    batch, real, padded = global_batch(cfg, step, parallel_state.get_data_parallel_rank(), cp)
    params = None
    if padded is None:
        batch = get_batch_on_this_cp_rank(batch, cp_group) if cp > 1 else batch
    else:
        # Transformer Engine's THD split (each padded document in 2*cp chunks, rank r keeps
        # r and 2*cp-1-r) is ringmem's "document" layout of the padded offsets
        batch = {k: ringmem.shard(v, dim=1, group=cp_group, layout="document",
                                  cu_seqlens=padded) for k, v in batch.items()}
        cu = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
        longest = max(b - a for a, b in zip(padded, padded[1:]))
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu(real), cu_seqlens_kv=cu(real),
                                 cu_seqlens_q_padded=cu(padded), cu_seqlens_kv_padded=cu(padded),
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
    return {k: v.to(device) for k, v in batch.items()}, params


def build_model(cfg: TrainMegatronConfig, cp: int, device: torch.device) -> torch.nn.Module:
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ringmem.integrations.megatron import ringmem_layer_spec

    dtype = getattr(torch, cfg.dtype)
    config = TransformerConfig(num_layers=cfg.layers, hidden_size=cfg.hidden,
                               num_attention_heads=cfg.heads, num_query_groups=cfg.kv_heads,
                               context_parallel_size=cp, use_cpu_initialization=True,
                               attention_dropout=0.0, hidden_dropout=0.0, params_dtype=dtype,
                               bf16=dtype == torch.bfloat16)
    spec = ringmem_layer_spec(schedule=cfg.schedule, ulysses=cfg.ulysses, backend=cfg.backend)
    torch.manual_seed(cfg.seed)  # identical weights on every rank (CPU initialisation)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=cfg.vocab,
                     max_sequence_length=cfg.seq_len,
                     position_embedding_type="rope")
    return model.to(device=device, dtype=dtype)


def reduce_gradients(model: torch.nn.Module, group: dist.ProcessGroup) -> None:
    """Sum the gradients over data x context parallel ranks in one collective: each rank's
    loss is its share of the global mean, so the sum is the global gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def train(cfg: TrainMegatronConfig, dp: int, cp: int, device: torch.device) -> None:
    from megatron.core import parallel_state

    from ringmem.integrations.megatron import cpu_shim

    cpu_shim()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    if device.type == "cuda":
        from megatron.core import tensor_parallel
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    rank = dist.get_rank()
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    model = build_model(cfg, cp, device)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"train_megatron: {cfg}\nmesh: dp={dp} cp={cp} tp=1 pp=1 on {dist.get_world_size()} "
              f"ranks ({dist.get_backend()}), {n:,} parameters, "
              f"{cfg.seq_len // cp} tokens per rank per sample", flush=True)
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc="train", file=sys.stderr)
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        batch, params = local_batch(cfg, step, device)
        optim.zero_grad(set_to_none=True)
        per_token = model(batch["tokens"], batch["position_ids"], None,
                          labels=batch["labels"], packed_seq_params=params)
        mask = batch["loss_mask"].to(per_token.dtype)
        count = mask.sum().float()
        dist.all_reduce(count, group=dp_cp)  # real tokens in the global batch
        loss = (per_token.float() * mask).sum() / count
        loss.backward()
        reduce_gradients(model, dp_cp)
        optim.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=dp_cp)
        if bar is not None:
            bar.write(f"step {step}/{cfg.steps} loss {total.item():.4f} "
                      f"({time.perf_counter() - t0:.2f} s)", file=sys.stdout)
            bar.set_postfix(loss=f"{total.item():.4f}")
            bar.update()
            sys.stdout.flush()
    if bar is not None:
        bar.close()
    parallel_state.destroy_model_parallel()


def main(argv: list[str] | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = check(argv, world)
        dp, cp = mesh(cfg, world)
    except ValueError as e:
        sys.exit(f"train_megatron: {e}")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group("nccl" if cuda else "gloo", timeout=cfg.timeout)
    with exit_on_comm_error("train_megatron"):
        train(cfg, dp, cp, torch.device("cuda") if cuda else torch.device("cpu"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
