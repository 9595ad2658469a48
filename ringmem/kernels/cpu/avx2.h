// The AVX2 + FMA + F16C path of the CPU decode kernel (decode.cpp), x86-64 only.
#pragma once
#include "common.h"

namespace ringmem_cpu {
// ---------------------------------------------------------------- AVX2 + FMA + F16C
#define RM_AVX2 __attribute__((target("avx2,fma,f16c")))

RM_AVX2 inline __m256 load8(const void* base, int64_t i, Elt e) {
  if (e == Elt::F32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  const __m128i h = _mm_loadu_si128(
      reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
  if (e == Elt::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

RM_AVX2 inline float hsum8(__m256 x) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// exp(x) for x <= 0: 2^(x log2 e) = 2^n * 2^f, f in [-0.5, 0.5], Cephes' exp2f polynomial
RM_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

RM_AVX2 void scores_avx2(const Args& a, const Tile& t, Elt e, float* s) {
  const int64_t T = t.hi - t.lo, D = a.d, G = a.g;
  const int64_t base = 0;  // runs are absolute rows of the [R, D] pools
  for (int64_t j = 0; j < T; ++j) {
    const int64_t kj = base + (t.lo + j) * D;
    for (int64_t r = 0; r < G; ++r) {
      const float* qr = a.q + (t.head * G + r) * D;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < D; c += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + c), load8(a.k, kj + c, e), acc);
      s[r * T + j] = hsum8(acc);
    }
  }
  cap_scores(s, G * T, a.softcap);
}

RM_AVX2 void softmax_avx2(float* s, int64_t g, int64_t t, float* m, float* l) {
  for (int64_t r = 0; r < g; ++r) {
    float* row = s + r * t;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < t; ++j) mx = std::max(mx, row[j]);
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= t; j += 8) {
      const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm));
      _mm256_storeu_ps(row + j, p);
      sum = _mm256_add_ps(sum, p);
    }
    float tail = 0.f;
    for (; j < t; ++j) {
      row[j] = std::exp(row[j] - mx);
      tail += row[j];
    }
    m[r] = mx;
    l[r] = hsum8(sum) + tail;
  }
}

RM_AVX2 void pv_avx2(const Args& a, const Tile& t, Elt e, const float* p, float* acc) {
  const int64_t T = t.hi - t.lo, D = a.d, G = a.g;
  const int64_t base = 0;  // runs are absolute rows of the [R, D] pools
  for (int64_t r0 = 0; r0 < G; r0 += 4) {  // 4 rows x 32 columns of accumulators
    const int64_t rows = std::min<int64_t>(4, G - r0);
    for (int64_t c0 = 0; c0 < D; c0 += 32) {
      const int64_t w = std::min<int64_t>(32, D - c0) / 8;
      __m256 ac[4][4];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) ac[r][c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < T; ++j) {
        const int64_t vj = base + (t.lo + j) * D + c0;
        __m256 vv[4];
        for (int c = 0; c < w; ++c) vv[c] = load8(a.v, vj + 8 * c, e);
        for (int r = 0; r < rows; ++r) {
          const __m256 pj = _mm256_set1_ps(p[(r0 + r) * T + j]);
          for (int c = 0; c < w; ++c) ac[r][c] = _mm256_fmadd_ps(pj, vv[c], ac[r][c]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < w; ++c) _mm256_storeu_ps(acc + (r0 + r) * D + c0 + 8 * c, ac[r][c]);
    }
  }
}

}  // namespace ringmem_cpu
