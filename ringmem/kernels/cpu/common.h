// Types and the plain C++ path of the CPU decode kernel (decode.cpp).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RINGMEM_X86 1
#endif

namespace ringmem_cpu {

enum class Elt : int { F32 = 0, BF16 = 1, F16 = 2 };

struct Tile {
  int64_t head, lo, hi, col;  // keys [lo, hi) of `head`; col: their first logits column
};

struct Args {
  const float* q;        // [Hq, D] fp32, scaled
  const uint16_t* qb;    // [Hq, D] bf16 (the scaled q rounded, for dpbf16), or null
  const void* k;         // [Hkv, N, D]
  const void* v;
  int64_t n, d, g;       // pool rows, head dim, query rows per KV head
  float softcap;         // 0: none
};

inline float bf16_to_f(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// round to nearest even, as _mm512_cvtneps_pbh does (finite inputs)
inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float half_to_f(uint16_t x) {
  c10::Half h;
  h.x = x;
  return static_cast<float>(h);
}

template <Elt E>
inline float load1(const void* base, int64_t i) {
  if constexpr (E == Elt::F32) return static_cast<const float*>(base)[i];
  else if constexpr (E == Elt::BF16) return bf16_to_f(static_cast<const uint16_t*>(base)[i]);
  else return half_to_f(static_cast<const uint16_t*>(base)[i]);
}

// softmax over one tile's scores s [G, T] (in place: s becomes p), m and l per row
inline void tile_softmax_scalar(float* s, int64_t g, int64_t t, float* m, float* l) {
  for (int64_t r = 0; r < g; ++r) {
    float* row = s + r * t;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < t; ++j) mx = std::max(mx, row[j]);
    float sum = 0.f;
    for (int64_t j = 0; j < t; ++j) {
      row[j] = std::exp(row[j] - mx);
      sum += row[j];
    }
    m[r] = mx;
    l[r] = sum;
  }
}

inline void cap_scores(float* s, int64_t count, float softcap) {
  if (softcap > 0.f)
    for (int64_t i = 0; i < count; ++i) s[i] = softcap * std::tanh(s[i] / softcap);
}

// ---------------------------------------------------------------- plain C++ (any CPU)
template <Elt E>
void tile_scalar(const Args& a, const Tile& t, float* s, float* m, float* l, float* acc) {
  const int64_t T = t.hi - t.lo, D = a.d, G = a.g;
  const int64_t base = 0;  // runs are absolute rows of the [R, D] pools
  for (int64_t j = 0; j < T; ++j) {
    const int64_t kj = base + (t.lo + j) * D;
    for (int64_t r = 0; r < G; ++r) {
      const float* qr = a.q + (t.head * G + r) * D;
      float dot = 0.f;
      for (int64_t c = 0; c < D; ++c) dot += qr[c] * load1<E>(a.k, kj + c);
      s[r * T + j] = dot;
    }
  }
  cap_scores(s, G * T, a.softcap);
}

template <Elt E>
void pv_scalar(const Args& a, const Tile& t, const float* p, float* acc) {
  const int64_t T = t.hi - t.lo, D = a.d, G = a.g;
  const int64_t base = 0;  // runs are absolute rows of the [R, D] pools
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t j = 0; j < T; ++j) {
    const int64_t vj = base + (t.lo + j) * D;
    for (int64_t r = 0; r < G; ++r) {
      const float pj = p[r * T + j];
      float* ar = acc + r * D;
      for (int64_t c = 0; c < D; ++c) ar[c] += pj * load1<E>(a.v, vj + c);
    }
  }
}

}  // namespace ringmem_cpu
