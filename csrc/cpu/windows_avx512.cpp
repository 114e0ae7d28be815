#include "windows_avx512.h"

#include <atomic>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define DTP_AVX512_WINDOWS 1
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*
// placeholders when masked gathers inline (a false positive of the compiler's headers).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace dtp_ext {
namespace {
std::atomic<bool> switched_on{true};
std::atomic<int64_t> windows_written{0};
}  // namespace

void count_vector_windows(int64_t windows) { windows_written += windows; }

int64_t vector_windows_written() { return windows_written.load(); }

bool vector_windows_supported() {
#ifdef DTP_AVX512_WINDOWS
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return has;
#else
  return false;
#endif
}

bool vector_windows_enabled() { return switched_on.load() && vector_windows_supported(); }

bool set_vector_windows(bool enabled) { return switched_on.exchange(enabled); }

#ifdef DTP_AVX512_WINDOWS
// Only the functions below are compiled for AVX-512 (the callers check the CPU first); every
// header is included above, so no inline function shared with other files is.
#define DTP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace {

DTP_AVX512 inline __mmask16 lanes(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1);
}

// window_takes, per lane: larger, or NaN.
DTP_AVX512 inline __mmask16 takes(__m512 candidate, __m512 best) {
  return _mm512_cmp_ps_mask(candidate, best, _CMP_GT_OQ) |
         _mm512_cmp_ps_mask(candidate, candidate, _CMP_UNORD_Q);
}

// Offsets (in elements) of lanes 0..15's pooled terms: lane * pooled.
DTP_AVX512 inline __m512i pooled_offsets(int64_t pooled) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(pooled)));
}

// Which of the window's positions (0: first, 1: right, 2: below, 3: below right) each active
// lane's pool index addresses, as four lane masks; false when an index addresses none of them
// (index_in_window's rule for k = 2: wrapping 64-bit offsets from the first position).
DTP_AVX512 inline bool window_positions(const int64_t* idx, __m512i offsets, __mmask16 m,
                                        const Window2x2& w, __mmask16 at[4]) {
  const __m512i first = _mm512_set1_epi64(w.first);
  const __m512i lo =
      _mm512_sub_epi64(_mm512_mask_i32gather_epi64(first, static_cast<__mmask8>(m),
                                                   _mm512_castsi512_si256(offsets), idx, 8),
                       first);
  const __m512i hi =
      _mm512_sub_epi64(_mm512_mask_i32gather_epi64(first, static_cast<__mmask8>(m >> 8),
                                                   _mm512_extracti64x4_epi64(offsets, 1), idx, 8),
                       first);
  const int64_t position[4] = {0, 1, w.width, w.width + 1};
  __mmask16 any = 0;
  for (int q = 0; q < 4; ++q) {
    const __m512i p = _mm512_set1_epi64(position[q]);
    at[q] = static_cast<__mmask16>(_mm512_cmpeq_epi64_mask(lo, p) |
                                   (static_cast<unsigned>(_mm512_cmpeq_epi64_mask(hi, p)) << 8));
    any |= at[q];
  }
  return (any & m) == m;
}

// c10::BFloat16's rounding (round_to_nearest_even; NaN becomes 0x7FC0) of 16 floats.
DTP_AVX512 inline __m256i round_to_bfloat16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(
      _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

DTP_AVX512 inline void store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
DTP_AVX512 inline void store(uint16_t* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, round_to_bfloat16(v));
}

// owned_difference at each of the window's positions: 0 (+ a where a_at) (- b where b_at), in
// that order, as the scalar pass adds them.
template <typename O>
DTP_AVX512 inline void write_window(O* out, const Window2x2& w, __mmask16 m, __m512 a,
                                    const __mmask16 a_at[4], __m512 b, const __mmask16* b_at) {
  const int64_t position[4] = {0, w.channels, w.row, w.row + w.channels};
  for (int q = 0; q < 4; ++q) {
    __m512 v = _mm512_mask_add_ps(_mm512_setzero_ps(), a_at[q], _mm512_setzero_ps(), a);
    if (b_at) v = _mm512_mask_sub_ps(v, b_at[q], v, b);
    store(out + position[q], m, v);
  }
}

DTP_AVX512 bool noisy_window_avx512(const uint16_t* z, const float* phi, const float* phi_of_phi,
                                    const float* clean, const int64_t* clean_idx,
                                    const Window2x2& w, uint16_t* out) {
  const __m512i offsets = pooled_offsets(w.pooled);
  const int64_t position[4] = {0, w.channels, w.row, w.row + w.channels};
  for (int64_t c = 0; c < w.channels; c += 16) {
    const __mmask16 m = lanes(w.channels - c);
    __m512i bits[4];
    __m512 rank[4];
    for (int q = 0; q < 4; ++q) {
      bits[q] = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, z + position[q] + c));
      rank[q] = _mm512_i32gather_ps(bits[q], phi, 4);
    }
    // window_argmax_2x2's tournament: first vs right, below vs below right, then the winners.
    const __mmask16 t01 = takes(rank[1], rank[0]), t23 = takes(rank[3], rank[2]);
    const __m512 best01 = _mm512_mask_blend_ps(t01, rank[0], rank[1]);
    const __m512 best23 = _mm512_mask_blend_ps(t23, rank[2], rank[3]);
    const __m512i bits01 = _mm512_mask_blend_epi32(t01, bits[0], bits[1]);
    const __m512i bits23 = _mm512_mask_blend_epi32(t23, bits[2], bits[3]);
    const __mmask16 t = takes(best23, best01);
    const __m512 a = _mm512_i32gather_ps(_mm512_mask_blend_epi32(t, bits01, bits23), phi_of_phi, 4);
    // The winner: 0/1 from the first match, 2/3 from the second, the second where it won.
    const __mmask16 a_at[4] = {static_cast<__mmask16>(~t & ~t01), static_cast<__mmask16>(~t & t01),
                               static_cast<__mmask16>(t & ~t23), static_cast<__mmask16>(t & t23)};
    if (clean) {
      __mmask16 b_at[4];
      if (!window_positions(clean_idx + c * w.pooled, offsets, m, w, b_at)) return false;
      const __m512 b =
          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, offsets, clean + c * w.pooled, 4);
      write_window(out + c, w, m, a, a_at, b, b_at);
    } else {
      write_window(out + c, w, m, a, a_at, _mm512_setzero_ps(), nullptr);
    }
  }
  return true;
}

template <typename O>
DTP_AVX512 bool scatter_window_avx512(const float* a, const int64_t* a_idx, const float* b,
                                      const int64_t* b_idx, float scale, const Window2x2& w,
                                      O* out) {
  const __m512i offsets = pooled_offsets(w.pooled);
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < w.channels; c += 16) {
    const __mmask16 m = lanes(w.channels - c);
    const int64_t at = c * w.pooled;
    __mmask16 a_at[4], b_at[4];
    if (!window_positions(a_idx + at, offsets, m, w, a_at)) return false;
    const __m512 av = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, offsets, a + at, 4);
    if (!b) {
      write_window(out + c, w, m, _mm512_mul_ps(s, av), a_at, _mm512_setzero_ps(), nullptr);
      continue;
    }
    if (b_idx == a_idx) {
      for (int q = 0; q < 4; ++q) b_at[q] = a_at[q];
    } else if (!window_positions(b_idx + at, offsets, m, w, b_at)) {
      return false;
    }
    const __m512 bv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, offsets, b + at, 4);
    write_window(out + c, w, m, _mm512_mul_ps(s, av), a_at, _mm512_mul_ps(s, bv), b_at);
  }
  return true;
}

}  // namespace
#endif

// The gathers address lanes by 32-bit element offsets (lane * pooled, 8-byte elements at most).
static bool offsets_fit(const Window2x2& w) { return w.pooled <= (int64_t(1) << 31) / (16 * 8); }

bool noisy_window_2x2_bf16(const uint16_t* z, const float* phi, const float* phi_of_phi,
                           const float* clean, const int64_t* clean_idx, const Window2x2& w,
                           uint16_t* out) {
#ifdef DTP_AVX512_WINDOWS
  return offsets_fit(w) && noisy_window_avx512(z, phi, phi_of_phi, clean, clean_idx, w, out);
#else
  return false;
#endif
}

bool scatter_window_2x2(const float* a, const int64_t* a_idx, const float* b, const int64_t* b_idx,
                        float scale, const Window2x2& w, float* out) {
#ifdef DTP_AVX512_WINDOWS
  return offsets_fit(w) && scatter_window_avx512(a, a_idx, b, b_idx, scale, w, out);
#else
  return false;
#endif
}

bool scatter_window_2x2(const float* a, const int64_t* a_idx, const float* b, const int64_t* b_idx,
                        float scale, const Window2x2& w, uint16_t* out) {
#ifdef DTP_AVX512_WINDOWS
  return offsets_fit(w) && scatter_window_avx512(a, a_idx, b, b_idx, scale, w, out);
#else
  return false;
#endif
}

}  // namespace dtp_ext
