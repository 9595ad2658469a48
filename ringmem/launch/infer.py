"""torchrun entry: long-document inference with a real model across the ranks.

    torchrun --standalone --nproc-per-node 2 ringmem/launch/infer.py \\
        [--config configs/infer_demo.toml]
    ringmem infer --nproc 2                      # the same, through the console command

Loads the model (the bundled SmolLM2-135M by default; "gemma3-270m", or a checkpoint
directory), reads a document (a file, or the King James Bible pass-key haystack), prefills
it sharded across the ranks chunk by chunk (compressed as it goes with `eviction`; found on
disk instead with `doc_cache`), answers its questions from that one prefill as one batch
(`launch/documents.py`), and prints per-rank memory (KV pools, tiers, peak), time to first
token, decode tokens/s and the answers. With `--jobs FILE.jsonl`: every document and
question of the file, answers appended to a JSONL as they come, resumable. gloo on CPU,
NCCL when CUDA is available.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ringmem.config import ArgumentParser, InferConfig, from_dict, load_config
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
    p.add_argument("--questions", nargs="+", help="several questions about --document, "
                   "answered from one prefill")
    p.add_argument("--answer-prefix", dest="answer_prefix")
    p.add_argument("--multi-line", dest="one_line", action="store_false", default=None,
                   help="base models: answers may run past their line's end")
    p.add_argument("--jobs", help="a JSONL file of jobs: document, questions, options")
    p.add_argument("--output", help="with --jobs: the answers' JSONL")
    p.add_argument("--on-error", dest="on_error", help="with --jobs: skip or stop")
    p.add_argument("--doc-cache", dest="doc_cache", action="store_true", default=None,
                   help="reuse prefilled document caches across runs (content-keyed)")
    p.add_argument("--doc-cache-dir", dest="doc_cache_dir")
    p.add_argument("--page-size", type=int, dest="page_size")
    p.add_argument("--max-context", type=int, dest="max_context")
    p.add_argument("--passkey-depth", type=float, dest="passkey_depth")
    p.add_argument("--compress", help="with --eviction: document or question")
    p.add_argument("--no-streaming", dest="streaming", action="store_false", default=None,
                   help="with --compress document: compress once after the whole document "
                   "is prefilled, not after every chunk")
    p.add_argument("--tier-host-pages", type=int, dest="tier_host_pages")
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
    if cfg.jobs is not None and not Path(cfg.jobs).is_file():
        raise ValueError(f"jobs file {cfg.jobs!r} does not exist or is not a file")
    return Path(cfg.document) if cfg.document else Path()


def document(cfg: InferConfig, tok) -> tuple[str, list[str], str | None]:
    """(document text, its questions, the expected pass key or None): the file and
    `questions` (or `question`), or the KJV pass-key haystack demo. A model with a chat
    template gets an announcing preamble and an instruction; a base model (no template)
    neither: it is prompted as a completion (`answer_prefix`)."""
    from ringmem.demo import haystack
    if cfg.document is None:
        chat = bool(getattr(tok, "chat_template", None))
        text, key = haystack.passkey_document(tok, tokens=cfg.haystack_tokens,
                                              depth=cfg.passkey_depth, seed=cfg.seed,
                                              offset=cfg.seed * 997 % 20000, preamble=chat)
        q = "What is the pass key? Answer with the number only." if chat else \
            "What is the pass key?"
        return text, [q], key
    text = Path(cfg.document).read_text(encoding="utf-8")
    return text, list(cfg.questions or [cfg.question]), None


def check_prompt(cfg: InferConfig, tok, text: str, questions: list[str]) -> None:
    """ValueError when the prompt (the document, the longest question with its template
    or answer prefix) and max_new_tokens do not fit max_context: the count the workers
    see."""
    from ringmem.launch.documents import prompt_ids
    prompt_ids(cfg, tok, text, questions)


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
        check_prompt(cfg, tok, *document(cfg, tok)[:2])
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
    from ringmem.demo import models
    from ringmem.integrations import hf
    from ringmem.jobs.keys import model_revision
    from ringmem.launch.documents import Documents
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group("nccl" if cuda else "gloo", timeout=cfg.timeout)
    rank, device = dist.get_rank(), "cuda" if cuda else "cpu"
    try:  # the prompt is checked with the tokenizer alone, before any weights exist
        tok = models.load_tokenizer(cfg.model)
        if cfg.jobs is None:
            text, questions, key = document(cfg, tok)
            check_prompt(cfg, tok, text, questions)
    except ValueError as e:
        dist.destroy_process_group()
        sys.exit(f"infer: {e}")
    from transformers import AutoModelForCausalLM
    if rank == 0:
        models.model_path(cfg.model)  # a packaged model's de-quantized copy, built once
    dist.barrier()
    path = models.model_path(cfg.model)
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype))
    model = model.to(device).eval()
    model.set_attn_implementation(hf.register(layout=cfg.layout, backend=cfg.backend))
    t_load = time.perf_counter() - t_load
    docs = Documents(cfg, model, tok, world=world, rank=rank, revision=model_revision(path))
    if cfg.jobs is not None:
        _jobs(cfg, docs, rank)
    else:
        _one(cfg, docs, text, questions, key, t_load)
    dist.destroy_process_group()


def _jobs(cfg: InferConfig, docs, rank: int) -> None:
    """Every job of the jobs file, resumable; answers appended to the output as they come."""
    from ringmem.jobs.jobsfile import Results, parse_jobs, run_jobs
    from ringmem.launch.documents import OPTIONS
    from ringmem.timeouts import CommError
    jobs, bad = parse_jobs(cfg.jobs, OPTIONS)
    out = cfg.output or str(Path(cfg.jobs).with_suffix(".answers.jsonl"))

    def answer(job, pending: list[int]):
        jc = docs.with_options(dict(job.options))
        pre = [job.prefixes[i] for i in pending] if job.prefixes else None
        for rec in docs.answer(jc, job.text, [job.questions[i] for i in pending],
                               prefixes=pre):
            rec["question_index"] = pending[rec["question_index"]]
            yield rec

    with Results(out, readonly=rank != 0) as results:
        # a lost or stuck peer stops the run on every rank (the others would wait for it);
        # errors every rank raises alike (a bad option, a prompt too long) skip the job
        summary = run_jobs(jobs, results, answer, bad=bad, on_error=cfg.on_error,
                           progress=rank == 0, write=rank == 0, fatal=(CommError,))
    if rank == 0:
        print(f"infer: jobs {cfg.jobs}: {summary}; answers in {out}", flush=True)


def _one(cfg: InferConfig, docs, text: str, questions: list[str], key: str | None,
         t_load: float) -> None:
    """One document and its questions, with the per-rank memory and timing report."""
    from ringmem.demo import haystack
    world, rank = docs.world, docs.rank
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(desc=f"prefill on {world} ranks", unit="tok", file=sys.stderr)
    progress = (lambda done: bar.update(done - bar.n)) if bar is not None else None
    dist.barrier()
    records = list(docs.answer(cfg, text, questions, progress=progress))
    if bar is not None:
        bar.close()
    st = records[-1]["cache"]
    mib = 2 ** 20
    line = (f"[rank {rank}/{world}] peak memory {st['peak_rss_bytes'] / mib:.0f} MiB, KV cache "
            f"{st['pool_bytes'] / mib:.1f} MiB allocated "
            f"({st['pages_in_use_bytes'] / mib:.1f} MiB in use), "
            f"{st['tokens_per_rank'][rank]} tokens held")
    if cfg.tier_host_pages or cfg.tier_disk_pages:
        line += (f"; tiers: host {st['host_tier_bytes'] / mib:.1f} MiB, disk "
                 f"{st['disk_tier_bytes'] / mib:.1f} MiB, pending "
                 f"{st['pending_bytes'] / mib:.1f} MiB")
    lines = [None] * world
    dist.all_gather_object(lines, line)
    if rank != 0:
        return
    first = records[0]
    n = first["prompt_tokens"]
    print(f"infer: model {cfg.model} ({t_load:.1f} s to load), prompt {n} tokens (document "
          f"{first['document_tokens']}), {len(questions)} question(s), {world} ranks, "
          f"layout {cfg.layout}, chunk {docs.chunk}", flush=True)
    print(*lines, sep="\n")
    last = max(records, key=lambda r: r["latency_s"])
    new = sum(r["new_tokens"] for r in records)
    decode_s = last["latency_s"] - first["first_token_s"]
    rate = (new - len(records)) / decode_s if decode_s > 0 else float("nan")
    print(f"time to first token {first['first_token_s']:.2f} s "
          f"({n / first['first_token_s']:,.0f} prompt tokens/s), decode "
          f"{rate:.1f} tokens/s over {new} tokens ({len(records)} row(s))")
    print(f"cache: tokens per rank {st['tokens_per_rank']}, document cache "
          f"{first['doc_cache']}, page size {cfg.page_size}")
    if cfg.eviction is not None:
        print(f"eviction: {cfg.eviction} at {cfg.budget:.0%} of the document per layer x KV "
              f"head ({cfg.allocation} allocation, compressed per {cfg.compress})")
    for r in sorted(records, key=lambda r: r["question_index"]):
        print(f"answer{'' if len(records) == 1 else ' ' + str(r['question_index'])}: "
              f"{r['answer']}")
    if key is not None:
        reply = records[0]["answer"]
        print(f"pass key {key}: {'correct' if haystack.answered(reply, key) else 'WRONG'}",
              flush=True)


if __name__ == "__main__":
    main()
