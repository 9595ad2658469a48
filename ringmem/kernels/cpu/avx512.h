// The AVX-512 and AVX-512 BF16 paths of the CPU decode kernel (decode.cpp), x86-64 only.
#pragma once
#include "common.h"

namespace ringmem_cpu {
// ---------------------------------------------------------------- AVX-512 (+ BF16)
#define RM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))
#define RM_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,f16c")))

template <Elt E>
RM_AVX512 inline __m512 load16e(const void* base, int64_t i) {
  if constexpr (E == Elt::F32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  const __m256i h = _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  if constexpr (E == Elt::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// the element type known only at run time
RM_AVX512 inline __m512 load16(const void* base, int64_t i, Elt e) {
  if (e == Elt::F32) return load16e<Elt::F32>(base, i);
  if (e == Elt::F16) return load16e<Elt::F16>(base, i);
  return load16e<Elt::BF16>(base, i);
}

RM_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// lane u of the result = the sum of a[u]'s lanes: 16 keys' dot products reduced together
// (45 shuffles and adds for 16 keys instead of a horizontal sum per key)
RM_AVX512 inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                       _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

RM_AVX512 void scores_avx512(const Args& a, const Tile& t, Elt e, float* s) {
  const int64_t T = t.hi - t.lo, D = a.d, G = a.g;
  const int64_t base = 0;  // runs are absolute rows of the [R, D] pools
  int64_t j0 = 0;
  for (; j0 + 16 <= T; j0 += 16) {  // 16 keys per row at once: 16 independent chains
    const int64_t kj = base + (t.lo + j0) * D;
    for (int64_t r = 0; r < G; ++r) {
      const float* qr = a.q + (t.head * G + r) * D;
      __m512 acc[16];
      for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 16) {
        const __m512 qv = _mm512_loadu_ps(qr + c);
        for (int u = 0; u < 16; ++u)
          acc[u] = _mm512_fmadd_ps(qv, load16(a.k, kj + u * D + c, e), acc[u]);
      }
      _mm512_storeu_ps(s + r * T + j0, reduce16(acc));
    }
  }
  for (int64_t j = j0; j < T; ++j) {
    const int64_t kj = base + (t.lo + j) * D;
    for (int64_t r = 0; r < G; ++r) {
      const float* qr = a.q + (t.head * G + r) * D;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + c), load16(a.k, kj + c, e), acc);
      s[r * T + j] = _mm512_reduce_add_ps(acc);
    }
  }
  cap_scores(s, G * T, a.softcap);
}

// One thread's K and V streams outrun the hardware prefetcher once this much compute sits
// between the loads. Each pass asks for its own stream's lines AHEAD keys further (into
// L2), a few per step so they never queue up in a burst: the scores pass for K, every
// column pass of the V product for its own columns of V (asks in the first pass only left
// memory idle during the second). Rows past the pool are not asked for.
// (measured, 1 thread, 256K keys, bf16, 4 rows per KV head, ns per key against a read's
// ~21: no asks 49; asks in the first V pass only 35.7; in every V pass 32.3; 64 keys ahead
// rather than 256, ~2 less; with the 4 x 4 score blocks below, 23-26. Asks into L1 (T0):
// 49. The next tile's lines asked evenly over this tile's whole work: no better.)
constexpr int64_t AHEAD = 64;

struct Prefetch {
  const char* at;   // next line to ask for
  const char* end;  // one past the last
  int64_t per;      // lines per step
  RM_AVX512 inline void step() {
    for (int64_t i = 0; i < per && at < end; ++i, at += 64) _mm_prefetch(at, _MM_HINT_T1);
  }
};

// the K lines of `keys` keys from row `first` + AHEAD (clipped to the pool), spread over
// `steps` calls of step(): what each score block asks for while it computes
RM_AVX512 inline Prefetch keys_ahead(const Args& a, const uint16_t* kb, int64_t first,
                                     int64_t keys, int64_t steps) {
  const int64_t pr = std::min(a.n, first + AHEAD);
  return Prefetch{reinterpret_cast<const char*>(kb + pr * a.d),
                  reinterpret_cast<const char*>(kb + std::min(a.n, pr + keys) * a.d),
                  (keys * a.d * 2 / 64 + steps - 1) / steps};
}

// bf16 keys: 32 products per instruction, the query rounded to bf16 as the torch path does
// DD: the head dim at compile time (0: a.d), so the 16 keys' loads are one base register
// plus constant offsets (a runtime dim spilled their 16 addresses)
template <int DD>
RM_AVX512BF16 void scores_bf16(const Args& a, const Tile& t, float* s) {
  const int64_t T = t.hi - t.lo, D = DD ? DD : a.d, G = a.g;
  const uint16_t* kb = static_cast<const uint16_t*>(a.k);  // absolute rows
  int64_t j0 = 0;
  // G a multiple of 4: blocks of 4 rows x 4 keys, so each key vector is loaded once for 4
  // rows (half the loads of 16 keys x 1 row); the 16 sums reduce together as below
  for (; G % 4 == 0 && j0 + 4 <= T; j0 += 4) {
    const uint16_t* kj = kb + (t.lo + j0) * D;
    Prefetch pf = keys_ahead(a, kb, t.lo + j0, 4, (G / 4) * (D / 32));
    for (int64_t r0 = 0; r0 < G; r0 += 4) {
      const uint16_t* q0 = a.qb + (t.head * G + r0) * D;
      __m512 acc[16];
      for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 32) {
        pf.step();
        __m512bh kv[4];
        for (int u = 0; u < 4; ++u) kv[u] = (__m512bh)_mm512_loadu_si512(kj + u * D + c);
        for (int r = 0; r < 4; ++r) {
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(q0 + r * D + c);
          for (int u = 0; u < 4; ++u)
            acc[4 * r + u] = _mm512_dpbf16_ps(acc[4 * r + u], qv, kv[u]);
        }
      }
      const __m512 sum = reduce16(acc);  // lane 4 r + u: row r0 + r, key j0 + u
      float* dst = s + r0 * T + j0;
      _mm_storeu_ps(dst, _mm512_extractf32x4_ps(sum, 0));
      _mm_storeu_ps(dst + T, _mm512_extractf32x4_ps(sum, 1));
      _mm_storeu_ps(dst + 2 * T, _mm512_extractf32x4_ps(sum, 2));
      _mm_storeu_ps(dst + 3 * T, _mm512_extractf32x4_ps(sum, 3));
    }
  }
  for (; G % 4 != 0 && j0 + 16 <= T; j0 += 16) {
    const uint16_t* kj = kb + (t.lo + j0) * D;
    Prefetch pf = keys_ahead(a, kb, t.lo + j0, 16, G * (D / 32));
    for (int64_t r = 0; r < G; ++r) {
      const uint16_t* qr = a.qb + (t.head * G + r) * D;
      __m512 acc[16];
      for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 32) {
        pf.step();
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + c);
        for (int u = 0; u < 16; ++u)
          acc[u] = _mm512_dpbf16_ps(acc[u], qv, (__m512bh)_mm512_loadu_si512(kj + u * D + c));
      }
      _mm512_storeu_ps(s + r * T + j0, reduce16(acc));
    }
  }
  for (int64_t j = j0; j < T; ++j) {
    const uint16_t* kj = kb + (t.lo + j) * D;
    for (int64_t r = 0; r < G; ++r) {
      const uint16_t* qr = a.qb + (t.head * G + r) * D;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qr + c),
                               (__m512bh)_mm512_loadu_si512(kj + c));
      s[r * T + j] = _mm512_reduce_add_ps(acc);
    }
  }
  cap_scores(s, G * T, a.softcap);
}

RM_AVX512BF16 void scores_avx512bf16(const Args& a, const Tile& t, float* s) {
  switch (a.d) {
    case 64: return scores_bf16<64>(a, t, s);
    case 128: return scores_bf16<128>(a, t, s);
    case 256: return scores_bf16<256>(a, t, s);
    default: return scores_bf16<0>(a, t, s);
  }
}

RM_AVX512 inline float row_max(const float* row, int64_t t) {
  __m512 vmx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= t; j += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(row + j));
  float mx = _mm512_reduce_max_ps(vmx);
  for (; j < t; ++j) mx = std::max(mx, row[j]);
  return mx;
}

RM_AVX512 void softmax_avx512(float* s, int64_t g, int64_t t, float* m, float* l) {
  for (int64_t r = 0; r < g; ++r) {
    float* row = s + r * t;
    const float mx = row_max(row, t);
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= t; j += 16) {
      const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), vm));
      _mm512_storeu_ps(row + j, p);
      sum = _mm512_add_ps(sum, p);
    }
    float tail = 0.f;
    for (; j < t; ++j) {
      row[j] = std::exp(row[j] - mx);
      tail += row[j];
    }
    m[r] = mx;
    l[r] = _mm512_reduce_add_ps(sum) + tail;
  }
}

// ROWS query rows x 64 columns of accumulators, all bounds known at compile time, so the
// 4 x ROWS accumulators stay in registers (runtime bounds spilled them)
template <Elt E, int ROWS>
RM_AVX512 void pv_block(const Args& a, const Tile& t, const float* p, float* acc, int64_t r0,
                        int64_t c0) {
  const int64_t T = t.hi - t.lo, D = a.d;
  __m512 ac[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) ac[r][c] = _mm512_setzero_ps();
  const float* pr[ROWS];
  for (int r = 0; r < ROWS; ++r) pr[r] = p + (r0 + r) * T;
  for (int64_t j = 0; j < T; ++j) {
    const int64_t vj = (t.lo + j) * D + c0;
    __m512 vv[4];
    for (int c = 0; c < 4; ++c) vv[c] = load16e<E>(a.v, vj + 16 * c);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 pj = _mm512_set1_ps(pr[r][j]);
      for (int c = 0; c < 4; ++c) ac[r][c] = _mm512_fmadd_ps(pj, vv[c], ac[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + (r0 + r) * D + c0 + 16 * c, ac[r][c]);
}

template <Elt E>
RM_AVX512 void pv_fast(const Args& a, const Tile& t, const float* p, float* acc) {
  for (int64_t r0 = 0; r0 < a.g; r0 += 4) {
    const int64_t rows = std::min<int64_t>(4, a.g - r0);
    for (int64_t c0 = 0; c0 < a.d; c0 += 64) {
      switch (rows) {
        case 4: pv_block<E, 4>(a, t, p, acc, r0, c0); break;
        case 3: pv_block<E, 3>(a, t, p, acc, r0, c0); break;
        case 2: pv_block<E, 2>(a, t, p, acc, r0, c0); break;
        default: pv_block<E, 1>(a, t, p, acc, r0, c0); break;
      }
    }
  }
}

RM_AVX512 void pv_avx512(const Args& a, const Tile& t, Elt e, const float* p, float* acc) {
  if (a.d % 64 == 0) {  // the common head dims (64, 128, 256)
    if (e == Elt::F32) return pv_fast<Elt::F32>(a, t, p, acc);
    if (e == Elt::BF16) return pv_fast<Elt::BF16>(a, t, p, acc);
    return pv_fast<Elt::F16>(a, t, p, acc);
  }
  const int64_t T = t.hi - t.lo, D = a.d, G = a.g;
  const int64_t base = 0;  // runs are absolute rows of the [R, D] pools
  for (int64_t r0 = 0; r0 < G; r0 += 4) {  // 4 rows x 64 columns of accumulators
    const int64_t rows = std::min<int64_t>(4, G - r0);
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
      const int64_t w = std::min<int64_t>(64, D - c0) / 16;
      __m512 ac[4][4];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) ac[r][c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < T; ++j) {
        const int64_t vj = base + (t.lo + j) * D + c0;
        __m512 vv[4];
        for (int c = 0; c < w; ++c) vv[c] = load16(a.v, vj + 16 * c, e);
        for (int r = 0; r < rows; ++r) {
          const __m512 pj = _mm512_set1_ps(p[(r0 + r) * T + j]);
          for (int c = 0; c < w; ++c) ac[r][c] = _mm512_fmadd_ps(pj, vv[c], ac[r][c]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < w; ++c)
          _mm512_storeu_ps(acc + (r0 + r) * D + c0 + 16 * c, ac[r][c]);
    }
  }
}

// ---------------------------------------------------------------- bf16 V by dpbf16
// p rounded to bf16 (as the torch path's bf16 softmax does) and l summed from the rounded
// values, so numerator and denominator agree; pb [G, T rounded up to even], the odd tail 0.
RM_AVX512BF16 void softmax_bf16(float* s, int64_t g, int64_t t, float* m, float* l,
                                uint16_t* pb, int64_t stride) {
  for (int64_t r = 0; r < g; ++r) {
    float* row = s + r * t;
    uint16_t* out = pb + r * stride;
    const float mx = row_max(row, t);
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= t; j += 16) {
      const __m256bh h = _mm512_cvtneps_pbh(exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), vm)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)h);
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(
                                   _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16)));
    }
    float tail = 0.f;
    for (; j < t; ++j) {
      out[j] = f_to_bf16(std::exp(row[j] - mx));
      tail += bf16_to_f(out[j]);
    }
    if (t % 2) out[t] = 0;
    m[r] = mx;
    l[r] = _mm512_reduce_add_ps(sum) + tail;
  }
}

// out lanes of a block's (lo, hi) accumulators: unpack*_epi16 pairs columns within 128-bit
// lanes, so lo holds columns {0-3, 8-11, 16-19, 24-27} of its 32 and hi the others
RM_AVX512BF16 inline void store_pairs(float* dst, __m512 lo, __m512 hi) {
  const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29,
                                       30, 31);
  _mm512_storeu_ps(dst, _mm512_permutex2var_ps(lo, i0, hi));
  _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(lo, i1, hi));
}

// ROWS query rows x 64 columns; two keys per dpbf16 (their V rows interleaved by unpack),
// half the multiply-adds of an fp32 V product and no bf16 -> fp32 conversion of V
template <int ROWS>
RM_AVX512BF16 void pv_block_bf16(const Args& a, const Tile& t, const uint16_t* pb,
                                 int64_t stride, float* acc, int64_t r0, int64_t c0) {
  const int64_t T = t.hi - t.lo, D = a.d;
  const uint16_t* vb = static_cast<const uint16_t*>(a.v);
  __m512 ac[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) ac[r][c] = _mm512_setzero_ps();
  const char* vc = reinterpret_cast<const char*>(vb);
  for (int64_t j = 0; j < T; j += 2) {
    const uint16_t* v0 = vb + (t.lo + j) * D + c0;
    if (r0 == 0)  // this pass's columns of keys j, j + 1, AHEAD on: every column pass
      for (int64_t pr = t.lo + j + AHEAD; pr < std::min(a.n, t.lo + j + AHEAD + 2); ++pr) {
        const char* at = vc + (pr * D + c0) * 2;
        _mm_prefetch(at, _MM_HINT_T1);
        _mm_prefetch(at + 64, _MM_HINT_T1);
      }
    const __m512i a0 = _mm512_loadu_si512(v0), a1 = _mm512_loadu_si512(v0 + 32);
    __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
    if (j + 1 < T) {  // an odd tail pairs with zeros (its p is 0 too), never the next row
      b0 = _mm512_loadu_si512(v0 + D);
      b1 = _mm512_loadu_si512(v0 + D + 32);
    }
    const __m512bh w[4] = {(__m512bh)_mm512_unpacklo_epi16(a0, b0),
                           (__m512bh)_mm512_unpackhi_epi16(a0, b0),
                           (__m512bh)_mm512_unpacklo_epi16(a1, b1),
                           (__m512bh)_mm512_unpackhi_epi16(a1, b1)};
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;
      std::memcpy(&pair, pb + (r0 + r) * stride + j, 4);
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < 4; ++c) ac[r][c] = _mm512_dpbf16_ps(ac[r][c], w[c], pp);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    float* dst = acc + (r0 + r) * D + c0;
    store_pairs(dst, ac[r][0], ac[r][1]);
    store_pairs(dst + 32, ac[r][2], ac[r][3]);
  }
}

RM_AVX512BF16 void pv_bf16(const Args& a, const Tile& t, const uint16_t* pb, int64_t stride,
                           float* acc) {
  for (int64_t r0 = 0; r0 < a.g; r0 += 4) {
    const int64_t rows = std::min<int64_t>(4, a.g - r0);
    for (int64_t c0 = 0; c0 < a.d; c0 += 64) {
      switch (rows) {
        case 4: pv_block_bf16<4>(a, t, pb, stride, acc, r0, c0); break;
        case 3: pv_block_bf16<3>(a, t, pb, stride, acc, r0, c0); break;
        case 2: pv_block_bf16<2>(a, t, pb, stride, acc, r0, c0); break;
        default: pv_block_bf16<1>(a, t, pb, stride, acc, r0, c0); break;
      }
    }
  }
}
}  // namespace ringmem_cpu
