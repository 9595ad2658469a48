"""torchrun entry: long-document inference with a real model across the ranks.

    torchrun --standalone --nproc-per-node 2 ringmem/launch/infer.py [--config configs/infer_demo.toml]
    ringmem infer --nproc 2                      # the same, through the console command

Loads the model (the bundled SmolLM2-135M by default), reads a document (a file, or the
King James Bible pass-key haystack), prefills it sharded across the ranks chunk by chunk,
answers the question with the sharded cache, and prints per-rank memory, time to first
token, decode tokens/s and cache statistics. gloo on CPU, NCCL when CUDA is available.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ringmem.config import ArgumentParser, InferConfig, from_dict, load_config
from ringmem.layouts import chunk_count
from ringmem.timeouts import exit_on_comm_error, init_process_group, resolve


def parse(argv: list[str] | None = None) -> InferConfig:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML file (see configs/); defaults: the demo")
    p.add_argument("--model")
    p.add_argument("--document")
    p.add_argument("--question")
    p.add_argument("--haystack-tokens", type=int, dest="haystack_tokens")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    p.add_argument("--chunk-size", type=int, dest="chunk_size")
    p.add_argument("--seed", type=int)
    p.add_argument("--eviction", help="compress the cache with this scorer after prefill")
    p.add_argument("--budget", type=float, help="with --eviction: share of the prompt kept")
    p.add_argument("--allocation", help="with --eviction: uniform, adaptive or global")
    p.add_argument("--snapkv-kernel", type=int, dest="snapkv_kernel",
                   help="with --eviction snapkv: pooling width (odd)")
    p.add_argument("--timeout", type=float, help="seconds to wait for a peer (RINGMEM_TIMEOUT)")
    args = vars(p.parse_args(argv))
    path = args.pop("config")
    if path is None:
        return from_dict(InferConfig, {k: v for k, v in args.items() if v is not None},
                         "command line")
    return load_config(InferConfig, path, **args)


def check_inputs(cfg: InferConfig, world: int | None) -> Path:
    """Every cheap check, before any process group, model or document is loaded (also run
    by the console command before torchrun starts; world None: unknown, elastic)."""
    from ringmem.demo import models
    resolve(cfg.timeout)  # a malformed RINGMEM_TIMEOUT fails here, not in every rank
    if world is not None and cfg.world_size is not None and cfg.world_size != world:
        raise ValueError(f"config asks for world_size={cfg.world_size}, torchrun started "
                         f"{world}")
    if cfg.document is not None:
        doc = Path(cfg.document)
        if not doc.is_file():
            raise ValueError(f"document {cfg.document!r} does not exist or is not a file")
        raw = doc.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"document {cfg.document!r} is not UTF-8 text (byte {e.start})"
                             ) from None
        if "\x00" in text:
            raise ValueError(f"document {cfg.document!r} holds NUL bytes: not a text file")
        if not text.strip():
            raise ValueError(f"document {cfg.document!r} is empty")
    if cfg.model not in (models.BUNDLED, models.GEMMA3):
        models.check_tokenizer(cfg.model)
    return Path(cfg.document) if cfg.document else Path()


def check_prompt(cfg: InferConfig, tok) -> tuple[torch.Tensor, str | None]:
    """(prompt ids, pass key) of `build_prompt`, or ValueError when longer than
    max_context: the count the workers see (the document plus the question and the chat
    template), not the document's alone."""
    ids, key = build_prompt(cfg, tok)
    if ids.shape[1] > cfg.max_context:
        raise ValueError(f"the prompt is {ids.shape[1]} tokens, longer than "
                         f"max_context={cfg.max_context}")
    return ids, key


def build_prompt(cfg: InferConfig, tok) -> tuple[torch.Tensor, str | None]:
    """(prompt ids [1, S], the expected pass key or None)."""
    from ringmem.demo import haystack
    if cfg.document is None:
        return haystack.passkey_prompt(tok, tokens=cfg.haystack_tokens,
                                       depth=cfg.passkey_depth, seed=cfg.seed,
                                       offset=cfg.seed * 997 % 20000)
    text = Path(cfg.document).read_text(encoding="utf-8")
    content = f"{text}\n\n{cfg.question}"
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": content}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
    else:
        ids = tok(f"{content}\nAnswer:", return_tensors="pt")["input_ids"]
    return ids, None


class _Clock:
    """A generate() streamer that timestamps tokens (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def check(argv: list[str] | None, world: int | None, prompt: bool = True) -> InferConfig:
    """The config and its inputs; prompt: also tokenize a document and check its length
    (the console command, before torchrun; the workers do it once in `job`). The demo
    haystack needs no check here: `haystack_tokens <= max_context` bounds it."""
    from ringmem.demo import models
    cfg = parse(argv)
    check_inputs(cfg, world)
    if prompt and cfg.document is not None:
        try:
            tok = models.load_tokenizer(cfg.model)
        except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception)
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"model {cfg.model!r}: its tokenizer does not load: {why}"
                             ) from None
        check_prompt(cfg, tok)
    return cfg


def main(argv: list[str] | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = check(argv, world, prompt=False)
    except ValueError as e:
        sys.exit(f"infer: {e}")
    with exit_on_comm_error("infer"):
        job(cfg, world)


def job(cfg: InferConfig, world: int) -> None:
    from ringmem.demo import haystack, models
    from ringmem.integrations import hf, hf_cache
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group("nccl" if cuda else "gloo", timeout=cfg.timeout)
    rank, device = dist.get_rank(), "cuda" if cuda else "cpu"
    try:  # the prompt is checked with the tokenizer alone, before any weights exist
        tok = models.load_tokenizer(cfg.model)
        ids, key = check_prompt(cfg, tok)
    except ValueError as e:
        dist.destroy_process_group()
        sys.exit(f"infer: {e}")
    from transformers import AutoModelForCausalLM
    if rank == 0:
        models.model_path(cfg.model)  # the bundled model's de-quantized copy, built once
    dist.barrier()
    path = models.model_path(cfg.model)
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype))
    model = model.to(device).eval()
    model.set_attn_implementation(hf.register(layout=cfg.layout, backend=cfg.backend))
    t_load = time.perf_counter() - t_load
    n = ids.shape[1]
    capacity = -(-(n + cfg.max_new_tokens) // world) + 2 * cfg.page_size
    policy = None
    if cfg.eviction is not None:
        from ringmem.eviction import EvictionPolicy, SnapKV, make_scorer
        scorer = (SnapKV(cfg.snapkv_kernel) if cfg.eviction == "snapkv"
                  else make_scorer(cfg.eviction))
        policy = EvictionPolicy(scorer=scorer, budget=float(cfg.budget),
                                decode_every=cfg.decode_every, allocation=cfg.allocation)
    options = {}
    if cfg.backend in ("torch", "sdpa", "triton"):  # decode through that backend too
        options["decode_backend"] = cfg.backend
    cache = hf_cache.RingmemCache.for_model(model, capacity=capacity, page_size=cfg.page_size,
                                            layout=cfg.layout, eviction=policy, **options)
    cache.backend = cfg.backend
    gran = chunk_count(cfg.layout, world)
    chunk = -(-cfg.chunk_size // gran) * gran  # the layout splits chunks evenly
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=n - 1, desc=f"prefill on {world} ranks", unit="tok", file=sys.stderr)
    clock = _Clock()
    ids = ids.to(device)
    dist.barrier()
    t0 = time.perf_counter()
    out = hf_cache.generate(model, ids, cache, chunk_size=chunk,
                            progress=(lambda done: bar.update(done - bar.n)) if bar else None,
                            max_new_tokens=cfg.max_new_tokens, do_sample=False,
                            streamer=clock, pad_token_id=tok.eos_token_id)
    t_end = time.perf_counter()
    if bar is not None:
        bar.close()
    new = out[0, n:]
    reply = tok.decode(new, skip_special_tokens=True).strip()
    ttft = clock.times[1] - t0 if len(clock.times) > 1 else float("nan")
    decode_s = t_end - clock.times[1] if len(clock.times) > 1 else float("nan")
    rate = (len(new) - 1) / decode_s if len(new) > 1 else float("nan")
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    stats = hf_cache.cache_stats(cache)
    line = (f"[rank {rank}/{world}] peak memory {peak / 2**20:.0f} MiB, KV cache "
            f"{stats['memory_bytes'] / 2**20:.1f} MiB allocated, "
            f"{cache.kv.rank_counts()[rank]} tokens held")
    lines = [None] * world
    dist.all_gather_object(lines, line)
    if rank == 0:
        print(f"infer: model {cfg.model} ({t_load:.1f} s to load), prompt {n} tokens, "
              f"{world} ranks, layout {cfg.layout}, chunk {chunk}", flush=True)
        print(*lines, sep="\n")
        print(f"time to first token {ttft:.2f} s ({(n - 1) / ttft:,.0f} prompt tokens/s), "
              f"decode {rate:.1f} tokens/s over {len(new)} tokens")
        print(f"cache: tokens per rank {stats['tokens_per_rank'][0]}, "
              f"{stats['cached_tokens'][0]} cached, page size {stats['page_size']}, "
              f"{stats['layers']} layers")
        if policy is not None:
            rec = cache.kv.eviction.records
            print(f"eviction: {cfg.eviction} at {cfg.budget:.0%} of the prompt per layer x KV "
                  f"head ({cfg.allocation} allocation), {len(rec)} compressions, "
                  f"{sum(r.evicted for r in rec):,} (layer, head, token) entries evicted")
        print(f"answer: {reply}")
        if key is not None:
            print(f"pass key {key}: {'correct' if haystack.answered(reply, key) else 'WRONG'}",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
