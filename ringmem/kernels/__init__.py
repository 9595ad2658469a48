"""Triton kernels for ringmem, installed as `ringmem.kernels`.

* `attention`: flash-attention forward for one ring block, the mask a band on absolute
  positions (lo <= (k_offset + j) - (q_offset + i) <= hi, either edge optional: full,
  causal, sliding-window pieces), optional logit softcap, GQA without expanding K/V
  (`attention_fwd`).
* `backward`: delta, dK/dV and dQ kernels (`attention_bwd`), fp32 gradients, same masks.
* `band`: the band and softcap pieces both share (constexpr HAS_LO / HAS_HI / SOFTCAP
  variants; the host folds the offsets into the edges).
* `decode`: split-KV decode of contiguous K/V (`decode_partial`) and of a paged pool's run
  list in one launch (`decode_runs`), combined by the fused merge.
* `merge`: the fused log-sum-exp merge of stacked partials (`merge_stacked`, `merge_rows`).
* `configs`: tile sets per GPU arch / head dim / dtype (autotuned on CUDA, one fixed tile
  under the interpreter), checked offline by `benchmarks/compile_kernels.py`.

All kernels address memory with int64 offsets and run fp32 dots in IEEE fp32 (no TF32).
Within the library only the "triton" backend (`ringmem.backends.triton_backend`) uses
them, importing them lazily, so the core runs without triton installed.
"""
