"""kvpress beside `ringmem eval`: the same generated samples through kvpress's pipeline.

kvpress 0.5.5 requires transformers<5.3, so it runs in its own virtual environment
(ringmem is not imported here: this file reads and writes plain JSON):

    python3.11 -m venv .venv-kvpress
    .venv-kvpress/bin/pip install torch==2.13.0 && .venv-kvpress/bin/pip install kvpress==0.5.5
    ringmem eval ... --out DIR                      # writes DIR/jobs.jsonl, runs ringmem
    .venv-kvpress/bin/python benchmarks/eval_kvpress.py --out DIR \\
        --model-dir ~/.cache/ringmem/SmolLM2-135M-Instruct --keep 0.1 0.25 0.5
    ringmem eval ... --out DIR --report-only        # scores both, one table

Each sample's full-cache job in DIR/jobs.jsonl gives the context and its questions. For
every press x keep, kvpress compresses the context once (its pipeline: question-agnostic,
the press sees the context alone) and every question is answered from that cache, one
process, greedy. Prompts are the text ringmem builds (`split_prompt`): a chat model gets
the context and "\\n\\n<question>" in one user turn and the question's answer prefix after
the generation prompt; a base model gets "<bos><context>\\n\\nQuestion: <q>\\n<prefix>".
Base models' answers end at their line's end as ringmem's do (a newline token other
than the first ends the answer; the text is cut at its first newline).

Answers go to DIR/answers_kvpress.jsonl ("id": "task:index:kvpress:PRESS:keep",
question_index, answer, seconds), resumable: answered questions are skipped.

Budgets: kvpress's compression_ratio is the share of the context's KV pairs removed,
per layer (each head the same share; AdaKV moves budget across a layer's heads; KVzip
without `layerwise` pools all layers). keep = 1 - compression_ratio.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def presses(name: str, ratio: float):
    import kvpress as kp
    made = {
        "snapkv": lambda: kp.SnapKVPress(compression_ratio=ratio),
        "tova": lambda: kp.TOVAPress(compression_ratio=ratio),
        "streaming": lambda: kp.StreamingLLMPress(compression_ratio=ratio),
        "expected": lambda: kp.ExpectedAttentionPress(compression_ratio=ratio),
        "knorm": lambda: kp.KnormPress(compression_ratio=ratio),
        "kvzip": lambda: kp.KVzipPress(compression_ratio=ratio),
        "adakv-snapkv": lambda: kp.AdaKVPress(kp.SnapKVPress(compression_ratio=ratio)),
        "adakv-expected": lambda: kp.AdaKVPress(kp.ExpectedAttentionPress(
            compression_ratio=ratio)),
    }
    if name not in made:
        raise ValueError(f"--presses: unknown press {name!r}; known: {sorted(made)}")
    return made[name]()


SLIDING = ("kvpress 0.5.5 cannot compress {cls}: it compresses its sliding-window layers "
           "too (measured here on Gemma-3-270M at 2K tokens: correct answers at keep 1.0, "
           "text unrelated to the question at keep 0.5 with KnormPress and SnapKVPress), and "
           "its own Gemma-3 rule (compress the global layers only, applied to "
           "Gemma3ForConditionalGeneration) fails on it: the attention mask keeps the "
           "uncompressed length (RuntimeError: size 989 vs 1947 at 2K tokens)")


def check_model(model) -> None:
    """Refuse a model kvpress would answer garbage for (SLIDING), before any run."""
    from transformers import Gemma3ForConditionalGeneration
    inner = getattr(model.model, "language_model", model.model)
    if (any(getattr(layer.self_attn, "is_sliding", False) for layer in inner.layers)
            and not isinstance(model, Gemma3ForConditionalGeneration)):
        raise SystemExit(SLIDING.format(cls=type(model).__name__))


PRESSES = ("snapkv", "tova", "streaming", "expected", "knorm", "kvzip", "adakv-snapkv",
           "adakv-expected")


def newline_ids(tok) -> set[int]:
    vocab = tok.get_vocab()
    maybe = [i for s, i in vocab.items() if "\n" in s or "Ċ" in s or "<0x0A>" in s]
    return {i for i in maybe if "\n" in tok.decode([i])}


def pipeline_for(model, tok, one_line: bool):
    """kvpress's pipeline, its greedy answer loop ending base models' answers as ringmem's."""
    from kvpress.pipeline import KVPressTextGenerationPipeline

    stops = newline_ids(tok) if one_line else set()

    class OneLine(KVPressTextGenerationPipeline):
        def generate_answer(self, question_ids, cache, context_length, max_new_tokens):
            pos = torch.arange(context_length, context_length + question_ids.shape[1]
                               ).unsqueeze(0)
            out = self.model(input_ids=question_ids, past_key_values=cache,
                             position_ids=pos, logits_to_keep=1)
            eos = self.model.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, list) else [eos])
            ids = [int(out.logits[0, -1].argmax())]
            for i in range(max_new_tokens - 1):
                if ids[-1] in eos or (len(ids) > 1 and ids[-1] in stops):
                    break
                out = self.model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache,
                                 position_ids=pos[:, -1:] + 1 + i)
                ids.append(int(out.logits[0, -1].argmax()))
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    return OneLine(model=model, tokenizer=tok)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the ringmem eval directory")
    p.add_argument("--model-dir", required=True, help="a transformers checkpoint directory")
    p.add_argument("--presses", nargs="+", default=list(PRESSES), choices=PRESSES)
    p.add_argument("--keep", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--max-new-tokens", type=int, default=48, dest="max_new_tokens")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar: the runs'

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    samples = [j for j in map(json.loads, (out / "jobs.jsonl").read_text().splitlines())
               if j["id"].split(":")[2] == "full"]
    path = out / "answers_kvpress.jsonl"
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["id"], r["question_index"]))
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    if any(k < 1.0 for k in a.keep):
        check_model(model)
    chat = bool(getattr(tok, "chat_template", None))
    pipe = pipeline_for(model, tok, one_line=not chat)
    runs = [(s, name, k) for s in samples for name in a.presses for k in a.keep]
    with path.open("a") as f, torch.no_grad():
        for smp, name, keep in tqdm(runs, desc="kvpress", unit="run"):
            task, index = smp["id"].split(":")[:2]
            jid = f"{task}:{index}:kvpress:{name}:{keep}"
            qs = smp["questions"]
            if all((jid, i) in done for i in range(len(qs))):
                continue
            ctx = pipe.preprocess(smp["text"], [""], "", max_context_length=10**9)
            qids = []
            for q in qs:  # each question with its own answer prefix
                text = f"\n\n{q['question']}" if chat else f"\n\nQuestion: {q['question']}"
                one = pipe.preprocess(smp["text"], [text], q["answer_prefix"],
                                      max_context_length=10**9)
                qids.append(one["questions_ids"][0])
            t0 = time.perf_counter()
            said = pipe._forward({"context_ids": ctx["context_ids"], "questions_ids": qids},
                                 max_new_tokens=a.max_new_tokens,
                                 press=presses(name, round(1.0 - keep, 6)))
            secs = time.perf_counter() - t0
            for i, s in enumerate(said):
                s = s.strip()
                f.write(json.dumps({"id": jid, "question_index": i,
                                    "answer": s if chat else s.split("\n")[0].strip(),
                                    "seconds": round(secs, 3),
                                    "context_tokens": int(ctx["context_ids"].shape[1])})
                        + "\n")
            f.flush()


if __name__ == "__main__":
    main()
