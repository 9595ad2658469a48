// One decode query's attention over paged K/V pools on the CPU, at the memory-bandwidth floor.
//
// q [Hq, D] (already scaled); k, v pools of fp32, bf16 or fp16 read as [R, D] rows (a cache's
// [Hkv, N, D] pools, or a host tier's [S, Hkv, P, D] segment); each KV head reads its own list
// of row runs [lo, hi) (CSR: bounds [runs, 2], offsets [Hkv + 1]). The G = Hq / Hkv
// query rows of a KV head go together, so each key and value is read once. The runs are cut
// into tiles of at most `tile` keys; each tile is one task (at::parallel_for): scores for its
// G rows into a small buffer, an online-softmax partial (m, l, acc) in fp32, the V product in
// the same task while its rows are still in cache. The tiles of a head are then merged by lse
// in a fixed order, so the result does not depend on the thread count.
//
// The instruction set is chosen at run time from the CPU's features (AVX-512 BF16, AVX-512,
// AVX2 + FMA + F16C, else plain C++), never from compile flags: each path is compiled with its
// own target attribute and only called where the CPU has it.
#include "common.h"
#ifdef RINGMEM_X86
#include "avx2.h"
#include "avx512.h"
#endif

namespace {
using namespace ringmem_cpu;

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

Isa best_isa() {
#ifdef RINGMEM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    if (__builtin_cpu_supports("avx512bf16")) return Isa::Avx512Bf16;
    return Isa::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return "avx512_bf16";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

// one tile: scores into s [G, T], then p, m, l, acc [G, D]
void run_tile(Isa isa, Elt e, const Args& a, const Tile& t, float* s, float* m, float* l,
              float* acc) {
  const int64_t T = t.hi - t.lo;
#ifdef RINGMEM_X86
  if (isa == Isa::Avx512Bf16 && e == Elt::BF16 && a.qb != nullptr && a.d % 32 == 0) {
    scores_avx512bf16(a, t, s);
  } else if ((isa == Isa::Avx512 || isa == Isa::Avx512Bf16) && a.d % 16 == 0) {
    scores_avx512(a, t, e, s);
  } else if (isa == Isa::Avx2 && a.d % 8 == 0) {
    scores_avx2(a, t, e, s);
  } else
#endif
  {
    if (e == Elt::F32) tile_scalar<Elt::F32>(a, t, s, m, l, acc);
    else if (e == Elt::BF16) tile_scalar<Elt::BF16>(a, t, s, m, l, acc);
    else tile_scalar<Elt::F16>(a, t, s, m, l, acc);
  }
}

void run_softmax_pv(Isa isa, Elt e, const Args& a, const Tile& t, float* s, float* m,
                    float* l, float* acc, uint16_t* pb) {
  const int64_t T = t.hi - t.lo;
#ifdef RINGMEM_X86
  if (isa == Isa::Avx512Bf16 && e == Elt::BF16 && a.d % 64 == 0) {  // p in bf16, as torch's
    const int64_t stride = T + (T % 2);
    softmax_bf16(s, a.g, T, m, l, pb, stride);
    pv_bf16(a, t, pb, stride, acc);
    return;
  }
  if ((isa == Isa::Avx512 || isa == Isa::Avx512Bf16) && a.d % 16 == 0) {
    softmax_avx512(s, a.g, T, m, l);
    pv_avx512(a, t, e, s, acc);
    return;
  }
  if (isa == Isa::Avx2 && a.d % 8 == 0) {
    softmax_avx2(s, a.g, T, m, l);
    pv_avx2(a, t, e, s, acc);
    return;
  }
#endif
  tile_softmax_scalar(s, a.g, T, m, l);
  if (e == Elt::F32) pv_scalar<Elt::F32>(a, t, s, acc);
  else if (e == Elt::BF16) pv_scalar<Elt::BF16>(a, t, s, acc);
  else pv_scalar<Elt::F16>(a, t, s, acc);
}

}  // namespace

// (out [Hq, D] fp32, lse [Hq] fp32, logits [Hkv, G, total] fp32 or empty)
std::vector<at::Tensor> decode(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor bounds,
                               at::Tensor offsets, double softcap, bool want_logits,
                               int64_t tile, int64_t isa_cap) {
  TORCH_CHECK(q.dim() == 2 && k.dim() >= 2 && v.sizes() == k.sizes(),
              "q [Hq, D]; k, v [..., D] of one shape");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous fp32 (scaled)");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.scalar_type() == v.scalar_type(),
              "k, v: contiguous, one dtype");
  TORCH_CHECK(bounds.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong,
              "bounds, offsets: int64");
  TORCH_CHECK(tile >= 1, "tile >= 1");
  // k, v are read as [R, D] rows; each KV head's runs are absolute row ranges
  const int64_t hkv = offsets.numel() - 1, d = k.size(-1), n = k.numel() / std::max<int64_t>(d, 1);
  const int64_t hq = q.size(0);
  TORCH_CHECK(hkv >= 1 && q.size(1) == d && hq % hkv == 0,
              "q [Hq, D] with Hq a multiple of the KV heads (offsets [Hkv + 1])");
  const int64_t g = hq / hkv;
  Elt e;
  switch (k.scalar_type()) {
    case at::kFloat: e = Elt::F32; break;
    case at::kBFloat16: e = Elt::BF16; break;
    case at::kHalf: e = Elt::F16; break;
    default: TORCH_CHECK(false, "k/v dtype must be float32, bfloat16 or float16");
  }
  Isa isa = std::min(best_isa(), static_cast<Isa>(isa_cap));
  at::Tensor qb;
  if (e == Elt::BF16 && isa == Isa::Avx512Bf16) qb = q.to(at::kBFloat16).contiguous();

  // tiles, in each head's read order; logits columns follow that order
  const int64_t* b = bounds.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  std::vector<Tile> tiles;
  std::vector<int64_t> first(hkv + 1, 0), seen(hkv, 0);
  for (int64_t h = 0; h < hkv; ++h) {
    first[h] = static_cast<int64_t>(tiles.size());
    int64_t col = 0;
    for (int64_t r = off[h]; r < off[h + 1]; ++r) {
      const int64_t lo = b[2 * r], hi = b[2 * r + 1];
      TORCH_CHECK(0 <= lo && lo <= hi && hi <= n, "run [", lo, ", ", hi, ") outside the ", n,
                  " rows of the pools");
      for (int64_t c = lo; c < hi; c += tile) {
        const int64_t e2 = std::min(hi, c + tile);
        tiles.push_back({h, c, e2, col});
        col += e2 - c;
      }
    }
    seen[h] = col;
  }
  first[hkv] = static_cast<int64_t>(tiles.size());
  int64_t widest = 0;
  for (int64_t h = 0; h < hkv; ++h) widest = std::max(widest, seen[h]);

  const int64_t nt = static_cast<int64_t>(tiles.size());
  std::vector<float> tm(nt * g), tl(nt * g), tacc(nt * g * d);
  at::Tensor logits = want_logits ? at::zeros({hkv, g, widest}, q.options()) : at::Tensor();
  float* lg = want_logits ? logits.data_ptr<float>() : nullptr;
  Args a{q.data_ptr<float>(),
         qb.defined() ? reinterpret_cast<const uint16_t*>(qb.data_ptr<at::BFloat16>()) : nullptr,
         k.data_ptr(), v.data_ptr(), n, d, g, static_cast<float>(softcap)};

  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(g * tile);
    std::vector<uint16_t> pb(g * (tile + 1));  // p in bf16 (the bf16 V path)
    for (int64_t i = begin; i < end; ++i) {
      const Tile& t = tiles[i];
      const int64_t T = t.hi - t.lo;
      float* m = tm.data() + i * g;
      float* l = tl.data() + i * g;
      float* acc = tacc.data() + i * g * d;
      run_tile(isa, e, a, t, s.data(), m, l, acc);
      if (lg != nullptr)
        for (int64_t r = 0; r < g; ++r)
          std::memcpy(lg + (t.head * g + r) * widest + t.col, s.data() + r * T, T * sizeof(float));
      run_softmax_pv(isa, e, a, t, s.data(), m, l, acc, pb.data());
    }
  });

  // merge each head's tiles by lse, in read order (thread-count independent)
  at::Tensor out = at::zeros({hq, d}, q.options());
  at::Tensor lse = at::full({hq}, -std::numeric_limits<float>::infinity(), q.options());
  float* o = out.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t r = 0; r < g; ++r) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = first[h]; i < first[h + 1]; ++i) mx = std::max(mx, tm[i * g + r]);
      if (mx == -std::numeric_limits<float>::infinity()) continue;  // no key: out 0, lse -inf
      double sum = 0.0;
      float* orow = o + (h * g + r) * d;
      std::vector<double> num(d, 0.0);
      for (int64_t i = first[h]; i < first[h + 1]; ++i) {
        const double w = std::exp(static_cast<double>(tm[i * g + r]) - mx);
        sum += w * tl[i * g + r];
        const float* ai = tacc.data() + (i * g + r) * d;
        for (int64_t c = 0; c < d; ++c) num[c] += w * ai[c];
      }
      for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<float>(num[c] / sum);
      ls[h * g + r] = static_cast<float>(mx + std::log(sum));
    }
  }
  if (want_logits) {
    // heads read different counts: a head's columns past its own are not keys
    std::vector<at::Tensor> res{out, lse, logits, at::tensor(seen, at::kLong)};
    return res;
  }
  return {out, lse};
}

std::string isa() { return isa_name(best_isa()); }

#ifdef RINGMEM_X86
RM_AVX512 int64_t read_avx512(const uint8_t* p, int64_t nbytes) {
  __m512i x = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 256 <= nbytes; i += 256)  // 4 independent 64-byte loads per step
    x = _mm512_xor_si512(
        x, _mm512_xor_si512(
               _mm512_xor_si512(_mm512_loadu_si512(p + i), _mm512_loadu_si512(p + i + 64)),
               _mm512_xor_si512(_mm512_loadu_si512(p + i + 128),
                                _mm512_loadu_si512(p + i + 192))));
  int64_t r = _mm512_reduce_or_epi64(x);
  for (; i < nbytes; ++i) r ^= p[i];
  return r;
}
#endif

// A plain read of a tensor's bytes (a checksum, so it is not optimised away), split over
// the threads like `decode`: the bandwidth floor the kernel is measured against.
int64_t read_bytes(at::Tensor t) {
  TORCH_CHECK(t.is_contiguous(), "read: a contiguous tensor");
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  const int64_t nbytes = t.numel() * t.element_size(), block = 1 << 20;
  const int64_t nb = (nbytes + block - 1) / block;
  std::vector<int64_t> part(nb, 0);
  const bool wide = best_isa() >= Isa::Avx512;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * block, n = std::min(block, nbytes - lo);
#ifdef RINGMEM_X86
      if (wide) {
        part[b] = read_avx512(p + lo, n);
        continue;
      }
#endif
      int64_t r = 0;
      for (int64_t i = 0; i + 8 <= n; i += 8) {
        int64_t w;
        std::memcpy(&w, p + lo + i, 8);
        r ^= w;
      }
      part[b] = r;
    }
  });
  int64_t r = 0;
  for (int64_t x : part) r ^= x;
  return r;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "paged decode attention over K/V pools (see decode.cpp)");
  m.def("isa", &isa, "the instruction set the kernel uses on this CPU");
  m.def("read", &read_bytes, "read a tensor's bytes once (the bandwidth floor of `decode`)");
}
