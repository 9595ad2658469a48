"""Triton kernels for ringmem, installed as `ringmem.kernels`.

* `attention`: flash-attention forward and backward for one ring block, causal masks
  given by absolute position offsets, GQA without expanding K/V (`attention_fwd`,
  `attention_bwd`).
* `decode`: split-KV decode (`decode_partial`): the forward kernel over several key
  splits, combined by the fused merge.
* `merge`: the fused log-sum-exp merge of stacked partials (`merge_stacked`).

Within the library only the "triton" backend (`ringmem.backends.triton_backend`) uses
them, importing them lazily, so the core runs without triton installed.
"""
