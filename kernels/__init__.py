"""Triton kernels for ringmem, installed as `ringmem.kernels`.

Empty until the Triton-kernels issue lands: block forward/backward with position-offset
masks, split-KV decode and the fused lse merge. Nothing here is imported by the core.
"""
