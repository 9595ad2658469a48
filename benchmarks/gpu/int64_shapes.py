"""The shapes whose element offsets pass 2^31 (int32 overflow in index arithmetic), run on
a GPU by gpu_check.sh: a single-GPU q of 1M x 32 x 128, a paged pool of 16 KV heads x 1M
slots, and a batch of 2 whose second row starts past 2^31 elements. Each checks rows at
the far end against a float32 reference. Needs ~40 GiB of GPU memory."""
from __future__ import annotations

import math
import sys

import torch

from ringmem.backends import get_backend
from ringmem.kernels.attention import attention_fwd

DEV, BF = torch.device("cuda"), torch.bfloat16


def ref_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain attention (non-causal) of q [n, Hq, D] over k, v [m, Hkv, D], in fp32."""
    g = q.shape[1] // k.shape[1]
    kx, vx = (t.float().repeat_interleave(g, 1) for t in (k, v))
    s = torch.einsum("nhd,mhd->hnm", q.float(), kx) * scale
    return torch.einsum("hnm,mhd->nhd", s.softmax(-1), vx)


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    err = (got.float() - want).abs().max().item()
    ok = math.isfinite(err) and err < 2e-2
    print(f"{name}: max error {err:.3e} {'ok' if ok else 'FAIL'}")
    return ok


def main() -> int:
    torch.manual_seed(0)
    d, scale, ok = 128, 128 ** -0.5, True
    # 1) q of 1M tokens x 32 heads x 128: 2^32 elements, token offsets past 2^31
    q = torch.randn(1, 1 << 20, 32, d, device=DEV, dtype=BF)
    k, v = (torch.randn(1, 256, 8, d, device=DEV, dtype=BF) for _ in range(2))
    out, _ = attention_fwd(q, k, v, scale, False)
    ok &= check("q 1M x 32 x 128, last 64 rows", out[0, -64:], ref_rows(q[0, -64:], k[0], v[0],
                                                                         scale))
    del q, out
    # 2) a paged pool of 16 KV heads x 1M slots: head offsets past 2^31
    pool_k, pool_v = (torch.randn(16, 1 << 20, d, device=DEV, dtype=BF) for _ in range(2))
    qd = torch.randn(64, d, device=DEV, dtype=BF)
    runs = [((1 << 20) - 4096, (1 << 20) - 1024), ((1 << 20) - 512, 1 << 20)]
    impl = get_backend("triton", DEV, BF, d)
    part = impl.decode(qd, pool_k, pool_v, runs, scale)
    keys = torch.cat([pool_k[:, lo:hi] for lo, hi in runs], 1).transpose(0, 1)
    vals = torch.cat([pool_v[:, lo:hi] for lo, hi in runs], 1).transpose(0, 1)
    ok &= check("pool 16 x 1M slots, decode over the last runs", part.out,
                ref_rows(qd[None], keys, vals, scale)[0])
    del pool_k, pool_v
    # 3) batch 2 whose second row starts at 2^31 elements
    q = torch.randn(2, 1 << 19, 32, d, device=DEV, dtype=BF)
    out, _ = attention_fwd(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), scale, False)
    ok &= check("batch 2 x 512K x 32 x 128, row 1's last 64", out[1, -64:],
                ref_rows(q[1, -64:], k[0], v[0], scale))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
