// CPU kernels of the fused elementwise passes (the private ops of csrc/common/elementwise_ops.h;
// per-element maths in csrc/common/elementwise_math.h), and the CPU's convolution layout.
//
// On the CPU the activations' transcendental functions (expm1, tanh) run through ATen's
// vectorised kernels on the pooled grid (a quarter of the full-resolution size for 2x2 pools),
// and one scalar pass writes the full-resolution tensor, each pooled element its own window.
// Full-resolution bfloat16/float16 maps are read as they are (phi looked up, results rounded
// as they are written), without float32 copies.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <type_traits>

#include "../common/block_products.h"
#include "../common/elementwise_math.h"
#include "../common/elementwise_ops.h"
#include "windows_avx512.h"

namespace dtp_ext {
namespace {

bool is_channels_last(const at::Tensor& t) {
  return dense_format(t) == at::MemoryFormat::ChannelsLast;
}

// Pool indices address a position of their own window (index_in_window, the rule the CUDA
// passes that own windows rely on); any other value is a caller's error, which the pooled
// passes record (the first bad value and its window) instead of writing it.
struct IndexGuard {
  const char* op;
  int64_t height, width, k;
  std::atomic<bool> bad{false};
  std::atomic<int64_t> value{0}, window{0};
  // `index` belongs to pooled element (oh, ow) of its plane.
  C10_ALWAYS_INLINE bool ok(int64_t index, int64_t oh, int64_t ow) {
    if (C10_LIKELY(index_in_window(index, width, k, oh, ow))) return true;
    refuse(index, oh * (width / k) + ow);
    return false;
  }
  C10_NOINLINE void refuse(int64_t index, int64_t q) {
    if (!bad.exchange(true)) {
      value = index;
      window = q;
    }
  }
  void check() const {
    const int64_t out_w = width / k;
    TORCH_CHECK_INDEX(
        !bad, op, ": indices must lie in [0, ", height * width, "), each in its own ", k, "x", k,
        " pool window of the pool's input plane (as max_pool2d returns them), got ", value.load(),
        " for the window at row ", window.load() / out_w, ", column ", window.load() % out_w);
  }
};

// The pooled grid (out_h x out_w windows of k x k) of a channels x height x width map.
struct PoolGrid {
  int64_t channels, out_h, out_w, height, width, k;
};

// What one pooled element writes in its window: owned_difference's value at a's position and at
// b's (the same value when they coincide) and zero elsewhere, each computed and rounded to O
// once, so each position costs a selection (a refused index, -1, matches no position: the op
// then raises).
template <typename O>
struct OwnedValues {
  int64_t a_at, b_at;
  O values[4];  // elsewhere, at a's position, at b's, at both (indexed without a branch)
  C10_ALWAYS_INLINE O operator()(int64_t at) const {
    return values[static_cast<int>(at == a_at) | (static_cast<int>(at == b_at) << 1)];
  }
};

// a at a_at, b (when there is one) at b_at.
template <typename O, typename T>
C10_ALWAYS_INLINE OwnedValues<O> owned_values(int64_t a_at, T a, int64_t b_at, const T* b,
                                              T scale) {
  const O at_a = static_cast<O>(owned_difference<T>(a_at, a_at, a, b_at, b, scale));
  const O at_b = static_cast<O>(owned_difference<T>(b_at, a_at, a, b_at, b, scale));
  return {a_at, b_at, {static_cast<O>(T(0)), at_a, at_b, at_a}};
}

// Pooled element j, at (oh, ow) of its plane, its indices checked (b's read and checked only
// when they are not a's: u = phi(y + eta) - phi(y) and the targets unpool both at y's).
template <typename O, typename T>
C10_ALWAYS_INLINE OwnedValues<O> owned_values(const T* a, const int64_t* a_idx, const T* b,
                                              const int64_t* b_idx, int64_t j, int64_t oh,
                                              int64_t ow, T scale, IndexGuard& guard) {
  const int64_t a_at = guard.ok(a_idx[j], oh, ow) ? a_idx[j] : -1;
  const int64_t b_at =
      !b ? -1 : (b_idx == a_idx ? a_at : (guard.ok(b_idx[j], oh, ow) ? b_idx[j] : -1));
  return owned_values<O>(a_at, a[j], b_at, b ? &b[j] : nullptr, scale);
}

// Writes every window of an images x channels x height x width output, values(n, c, oh, ow, j)
// giving the OwnedValues of pooled element j (its NCHW index on the pooled grid): the
// window-owning form of the pooled passes, as on CUDA (write_owned_window), which writes every
// output once instead of zero-filling and scattering. NCHW: planes are contiguous and disjoint,
// one task per plane range. Channels-last: a plane's positions are C elements apart, so writing
// plane by plane touches a cache line per element; each task takes rows of windows of an image
// instead and writes each window position's C channels contiguously (faster than plane by
// plane: benchmarks/RESULTS.md, Kernel choices). There, whole(image, n, oh, ow, j) may
// write a window's k x k positions for every channel at once (the AVX-512 kernels) and return
// true; the positions the window owns beyond them are then zeroed here.
struct NoWholeWindows {
  template <typename O>
  bool operator()(O*, int64_t, int64_t, int64_t, int64_t) const {
    return false;
  }
};

// Zeros the positions pooled element (oh, ow) owns beyond its k x k window (the last window of
// a row or column of a map that is not a multiple of k; no pooled term lands there) in a
// channels-last image.
template <typename O>
void zero_owned_edge(O* image, int64_t oh, int64_t ow, const PoolGrid& g) {
  const bool last_row = oh + 1 == g.out_h && g.height > g.out_h * g.k;
  const bool last_col = ow + 1 == g.out_w && g.width > g.out_w * g.k;
  if (!last_row && !last_col) return;
  for_each_owned_position<int64_t>(
      oh, ow, g.out_h, g.out_w, g.height, g.width, g.k, [&](int64_t at) {
        if (at / g.width - oh * g.k >= g.k || at % g.width - ow * g.k >= g.k) {
          std::fill_n(image + at * g.channels, g.channels, O(0.0f));
        }
      });
}

template <typename O, typename Values, typename Whole = NoWholeWindows>
void write_pooled_windows(O* out, int64_t images, const PoolGrid& g, bool channels_last,
                          const Values& values, const Whole& whole = {}) {
  const int64_t pooled = g.out_h * g.out_w, plane_size = g.height * g.width;
  const int64_t channels = g.channels;
  if (!channels_last) {
    at::parallel_for(0, images * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / channels, c = p % channels;
        int64_t j = p * pooled;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          for (int64_t ow = 0; ow < g.out_w; ++ow, ++j) {
            write_owned_window<int64_t>(out + p * plane_size, oh, ow, g.out_h, g.out_w, g.height,
                                        g.width, g.k, values(n, c, oh, ow, j));
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, images * g.out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<OwnedValues<O>> window(channels);
    int64_t whole_windows = 0;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      O* image = out + n * plane_size * channels;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        int64_t j = n * channels * pooled + oh * g.out_w + ow;
        if (whole(image, n, oh, ow, j)) {
          zero_owned_edge(image, oh, ow, g);
          ++whole_windows;
          continue;
        }
        for (int64_t c = 0; c < channels; ++c, j += pooled) window[c] = values(n, c, oh, ow, j);
        for_each_owned_position<int64_t>(oh, ow, g.out_h, g.out_w, g.height, g.width, g.k,
                                         [&](int64_t at) {
                                           O* position = image + at * channels;
                                           for (int64_t c = 0; c < channels; ++c) {
                                             position[c] = window[c](at);
                                           }
                                         });
      }
    }
    if (whole_windows) count_vector_windows(whole_windows);
  });
}

// The 2x2 window of pooled element (oh, ow) as the AVX-512 kernels address it.
Window2x2 window_2x2(const PoolGrid& g, int64_t oh, int64_t ow) {
  return {g.channels, g.width * g.channels, (oh * g.width + ow) * 2, g.width, g.out_h * g.out_w};
}

// scatter_difference's AVX-512 window (float32 terms, float32 or bfloat16 out); false for other
// types, which the scalar pass writes.
template <typename T, typename O>
bool scatter_whole_window(const T* a, const int64_t* a_idx, const T* b, const int64_t* b_idx,
                          T scale, const Window2x2& w, O* out) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<O, float>) {
    return scatter_window_2x2(a, a_idx, b, b_idx, scale, w, out);
  } else if constexpr (std::is_same_v<T, float> && std::is_same_v<O, c10::BFloat16>) {
    return scatter_window_2x2(a, a_idx, b, b_idx, scale, w, reinterpret_cast<uint16_t*>(out));
  } else {
    return false;
  }
}

// out = scale * (unpool(a, a_idx) - unpool(b, b_idx)), in `out_dtype` (a's, or bfloat16/float16
// for float32 a and b: computed in float32 and rounded once); a, b and the indices on the
// pooled grid (NCHW), out NCHW or channels-last.
at::Tensor scatter_difference(const char* op, const at::Tensor& a_in, const at::Tensor& a_idx_in,
                              const at::Tensor& b_in, const at::Tensor& b_idx_in,
                              at::IntArrayRef out_sizes, int64_t pool, double scale,
                              bool channels_last, at::ScalarType out_dtype) {
  RECORD_FUNCTION("dtp_ext::scatter_difference", std::vector<c10::IValue>());
  const auto a = a_in.contiguous(), a_idx = a_idx_in.contiguous();
  const bool has_b = b_in.defined();  // an undefined b means no second term
  const auto b = has_b ? b_in.contiguous() : at::Tensor();
  const auto b_idx = has_b ? b_idx_in.contiguous() : at::Tensor();
  auto out = at::empty(out_sizes, a.options().dtype(out_dtype).memory_format(
                                      channels_last ? at::MemoryFormat::ChannelsLast
                                                    : at::MemoryFormat::Contiguous));
  const int64_t out_h = a.size(2), out_w = a.size(3);
  if (out.numel() == 0) return out;
  // Maps smaller than the pool: no pooled element, so nothing owns a position.
  if (out_h * out_w == 0) return out.zero_();
  IndexGuard index_guard{op, out.size(2), out.size(3), pool};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "scatter_difference_cpu", [&] {
    using math_t = scalar_t;
    TORCH_INTERNAL_ASSERT(out_dtype == a.scalar_type() ||
                          (std::is_same_v<math_t, float> && c10::isReducedFloatingType(out_dtype)));
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, out_dtype, "scatter_difference_cpu_out", [&] {
          if constexpr (std::is_same_v<scalar_t, math_t> || std::is_same_v<math_t, float>) {
            const math_t* ap = a.const_data_ptr<math_t>();
            const int64_t* ai = a_idx.const_data_ptr<int64_t>();
            const math_t* bp = has_b ? b.const_data_ptr<math_t>() : nullptr;
            const int64_t* bi = has_b ? b_idx.const_data_ptr<int64_t>() : nullptr;
            const PoolGrid grid{a.size(1), out_h, out_w, out.size(2), out.size(3), pool};
            const auto s = static_cast<math_t>(scale);
            const bool vector = channels_last && pool == 2 && vector_windows_enabled();
            write_pooled_windows(
                out.mutable_data_ptr<scalar_t>(), a.size(0), grid, channels_last,
                [&](int64_t, int64_t, int64_t oh, int64_t ow, int64_t j) {
                  return owned_values<scalar_t>(ap, ai, bp, bi, j, oh, ow, s, index_guard);
                },
                [&](scalar_t* image, int64_t, int64_t oh, int64_t ow, int64_t j) {
                  if (!vector) return false;
                  const auto w = window_2x2(grid, oh, ow);
                  return scatter_whole_window(ap + j, ai + j, bp ? bp + j : nullptr,
                                              bi ? bi + j : nullptr, s, w,
                                              image + w.first * grid.channels);
                });
          }
        });
  });
  index_guard.check();
  return out;
}

// Where the k x k window of a plane (neighbours `es` apart) starting at position `first` has
// its maximum by rank(value) (max-pool's rule), with that rank in `best`: a 2x2 window by the
// branch-free tournament (window_argmax_2x2), any other by the row-major window_argmax_scan.
template <typename T, typename Rank, typename R>
C10_ALWAYS_INLINE int64_t window_argmax_2x2_or_scan(const T* plane, int64_t es, int64_t first,
                                                    int64_t width, int64_t k, const Rank& rank,
                                                    R& best) {
  if (k == 2) {
    return first + window_argmax_2x2(rank(plane[first * es]), rank(plane[(first + 1) * es]),
                                     rank(plane[(first + width) * es]),
                                     rank(plane[(first + width + 1) * es]), width, best);
  }
  return window_argmax_scan(plane, es, first, width, k, rank, best);
}

// phi(v) and phi(phi(v)) in float32 for every value v of a 16-bit float type (bfloat16 or
// float16, indexed by its bits), computed once per activation and dtype by ATen's own
// activation on float32: what activate(z.to(float)) and activate of that give each element. The
// low-precision noisy pass ranks its windows by phi and takes the winner's phi(phi(z)) by
// looking them up, instead of writing phi(z) of the whole map in float32 first (a full-size
// float32 cast and activation per iteration, a quarter of the bfloat16 feedback phase).
struct PhiTables {
  const float* phi;
  const float* phi_of_phi;
};

PhiTables phi_lookup_tables(Activation activation, at::ScalarType dtype) {
  static std::mutex mutex;
  static std::map<std::pair<Activation, at::ScalarType>, std::pair<at::Tensor, at::Tensor>> tables;
  std::lock_guard<std::mutex> lock(mutex);
  auto& table = tables[{activation, dtype}];
  if (!table.first.defined()) {
    auto bits = at::empty({1 << 16}, at::kShort);
    int16_t* p = bits.mutable_data_ptr<int16_t>();
    for (int32_t i = 0; i < (1 << 16); ++i) p[i] = static_cast<int16_t>(static_cast<uint16_t>(i));
    table.first = activate(activation, bits.view(dtype).to(at::kFloat)).contiguous();
    table.second = activate(activation, table.first).contiguous();
  }
  return {table.first.const_data_ptr<float>(), table.second.const_data_ptr<float>()};
}

// Ranks a 16-bit value by phi of it, looked up.
struct PhiRanked {
  const float* phi;
  template <typename T>
  float operator()(T v) const {
    return phi[v.x];
  }
};

// The noisy difference of a bfloat16/float16 map in one pass: each k x k window (neighbours
// `es` apart) ranked by phi looked up (max-pool's rule), its winner's phi(phi(z)) looked up, the
// clean term subtracted (clean_at -1: none), as the window's values rounded once to T.
template <typename T>
C10_ALWAYS_INLINE OwnedValues<T> noisy_window(const T* plane, int64_t es, int64_t oh, int64_t ow,
                                              int64_t width, int64_t k, const PhiTables& tables,
                                              int64_t clean_at, const float* clean) {
  float best;
  const int64_t at = window_argmax_2x2_or_scan(plane, es, (oh * width + ow) * k, width, k,
                                               PhiRanked{tables.phi}, best);
  return owned_values<T>(at, tables.phi_of_phi[plane[at * es].x], clean_at, clean, 1.0f);
}

// write_pooled_windows's loops written out: through its per-element callback this pass ran
// markedly slower (benchmarks/RESULTS.md, Kernel choices).
template <typename T>
void noisy_difference_lookup(const T* z, const PhiTables& tables, const float* clean,
                             const int64_t* clean_idx, T* out, int64_t images, const PoolGrid& g,
                             bool channels_last, IndexGuard& guard) {
  const int64_t pooled = g.out_h * g.out_w, plane_size = g.height * g.width;
  const auto clean_term = [&](int64_t j, int64_t oh, int64_t ow) {
    return clean && guard.ok(clean_idx[j], oh, ow) ? clean_idx[j] : int64_t(-1);
  };
  if (!channels_last) {
    at::parallel_for(0, images * g.channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const T* plane = z + p * plane_size;
        int64_t j = p * pooled;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          for (int64_t ow = 0; ow < g.out_w; ++ow, ++j) {
            write_owned_window<int64_t>(
                out + p * plane_size, oh, ow, g.out_h, g.out_w, g.height, g.width, g.k,
                noisy_window(plane, 1, oh, ow, g.width, g.k, tables, clean_term(j, oh, ow),
                             clean ? &clean[j] : nullptr));
          }
        }
      }
    });
    return;
  }
  // Channels-last: rows of windows of an image, each window's positions written channel
  // vector by channel vector (as write_pooled_windows).
  const int64_t channels = g.channels;
  // bfloat16 2x2 windows: the AVX-512 kernel writes each window's channels 16 at a time.
  const bool vector = std::is_same_v<T, c10::BFloat16> && g.k == 2 && vector_windows_enabled();
  at::parallel_for(0, images * g.out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<OwnedValues<T>> values(channels);
    int64_t vector_windows = 0;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      const T* image = z + n * plane_size * channels;
      T* image_out = out + n * plane_size * channels;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        int64_t j = n * channels * pooled + oh * g.out_w + ow;
        if (vector) {
          const auto w = window_2x2(g, oh, ow);
          if (noisy_window_2x2_bf16(reinterpret_cast<const uint16_t*>(image + w.first * channels),
                                    tables.phi, tables.phi_of_phi, clean ? clean + j : nullptr,
                                    clean ? clean_idx + j : nullptr, w,
                                    reinterpret_cast<uint16_t*>(image_out + w.first * channels))) {
            zero_owned_edge(image_out, oh, ow, g);
            ++vector_windows;
            continue;
          }
        }
        for (int64_t c = 0; c < channels; ++c, j += pooled) {
          values[c] = noisy_window(image + c, channels, oh, ow, g.width, g.k, tables,
                                   clean_term(j, oh, ow), clean ? &clean[j] : nullptr);
        }
        for_each_owned_position<int64_t>(oh, ow, g.out_h, g.out_w, g.height, g.width, g.k,
                                         [&](int64_t at) {
                                           T* position = image_out + at * channels;
                                           for (int64_t c = 0; c < channels; ++c)
                                             position[c] = values[c](at);
                                         });
      }
    }
    if (vector_windows) count_vector_windows(vector_windows);
  });
}

// The float32/float64 window max ranks phi(z) as stored.
struct Stored {
  template <typename T>
  T operator()(T v) const {
    return v;
  }
};

// Max-pool (kernel = stride = k) of phi(z) held in z, by max-pool's rule, and where each maximum
// sits; z in its own layout (NCHW planes, or channels-last images whose window positions are read
// as C-channel vectors), maxima and indices NCHW.
template <typename T>
void window_max_kernel(const at::Tensor& z, at::Tensor& out, at::Tensor& idx, int64_t k) {
  const T* zp = z.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  const int64_t channels = z.size(1), height = z.size(2), width = z.size(3);
  const int64_t out_h = height / k, out_w = width / k, pooled = out_h * out_w;
  if (!is_channels_last(z)) {
    at::parallel_for(0, z.size(0) * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const T* plane = zp + p * height * width;
        int64_t j = p * pooled;
        for (int64_t oh = 0; oh < out_h; ++oh) {
          for (int64_t ow = 0; ow < out_w; ++ow, ++j) {
            ip[j] = window_argmax_2x2_or_scan(plane, 1, (oh * width + ow) * k, width, k, Stored{},
                                              op[j]);
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, z.size(0) * out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_h, oh = row % out_h;
      const T* image = zp + n * height * width * channels;
      for (int64_t ow = 0; ow < out_w; ++ow) {
        int64_t j = n * channels * pooled + oh * out_w + ow;
        for (int64_t c = 0; c < channels; ++c, j += pooled) {
          ip[j] = window_argmax_2x2_or_scan(image + c, channels, (oh * width + ow) * k, width, k,
                                            Stored{}, op[j]);
        }
      }
    }
  });
}

// The window max of phi(z) held in z (float32/float64) and where it sits.
std::tuple<at::Tensor, at::Tensor> window_max(const at::Tensor& z_in, int64_t k) {
  RECORD_FUNCTION("dtp_ext::window_max", std::vector<c10::IValue>());
  const auto z = is_channels_last(z_in) ? z_in : z_in.contiguous();
  const auto sizes = std::vector<int64_t>{z.size(0), z.size(1), z.size(2) / k, z.size(3) / k};
  auto out = at::empty(sizes, z.options());
  auto idx = at::empty(sizes, z.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "window_max_cpu",
                             [&] { window_max_kernel<scalar_t>(z, out, idx, k); });
  return {out, idx};
}

// bfloat16/float16 a: phi, the differences and the scatter run in float32 (ATen's vectorised
// activation converts at full speed) and the result is rounded once to a's dtype as it is
// written; the products around the pass are what run in the low dtype.
at::Tensor phi_unpool_difference_cpu(const char* op, const at::Tensor& a, const at::Tensor& a_noise,
                                     double alpha, const at::Tensor& a_indices,
                                     const at::Tensor& phi_b, const at::Tensor& b_indices,
                                     at::IntArrayRef out_sizes, int64_t pool, Activation activation,
                                     double scale, bool channels_last) {
  const auto a_math = to_opmath(a);
  const auto phi_a = activate(activation, a_noise.defined() ? a_math.add(a_noise, alpha) : a_math);
  if (!a_indices.defined()) {
    return (phi_a - to_opmath(phi_b)).mul_(scale).view(out_sizes).to(a.scalar_type());
  }
  return scatter_difference(op, phi_a, a_indices, to_opmath(phi_b), b_indices, out_sizes, pool,
                            scale, channels_last, a.scalar_type());
}

// bfloat16/float16 z with a pool: noisy_difference_lookup, on z in its own layout.
at::Tensor noisy_difference_reduced(const at::Tensor& z_in, const at::Tensor& clean_phi_output,
                                    const at::Tensor& clean_indices, Activation activation,
                                    int64_t pool, bool channels_last) {
  RECORD_FUNCTION("dtp_ext::noisy_difference_lookup", std::vector<c10::IValue>());
  const auto z =
      channels_last ? z_in.contiguous(at::MemoryFormat::ChannelsLast) : z_in.contiguous();
  auto out = at::empty_like(z);
  const PoolGrid grid{z.size(1), z.size(2) / pool, z.size(3) / pool, z.size(2), z.size(3), pool};
  if (out.numel() == 0) return out;
  if (grid.out_h * grid.out_w == 0) return out.zero_();  // nothing owns a position
  const bool has_clean = clean_phi_output.defined();
  const auto clean = has_clean ? to_opmath(clean_phi_output).contiguous() : at::Tensor();
  const auto clean_idx = has_clean ? clean_indices.contiguous() : at::Tensor();
  IndexGuard index_guard{"dtp_ext.noisy_difference", z.size(2), z.size(3), pool};
  const auto tables = phi_lookup_tables(activation, z.scalar_type());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(z.scalar_type(), "noisy_difference_lookup", [&] {
    noisy_difference_lookup(
        z.const_data_ptr<scalar_t>(), tables, has_clean ? clean.const_data_ptr<float>() : nullptr,
        has_clean ? clean_idx.const_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
        z.size(0), grid, channels_last, index_guard);
  });
  index_guard.check();
  return out;
}

// bfloat16/float16 z: the pool ranks phi(z) looked up in float32 (phi_lookup_tables), the
// differences are formed in float32 and rounded once to z's dtype as they are written.
at::Tensor noisy_difference_cpu(const at::Tensor& z, const at::Tensor& clean_phi_output,
                                const at::Tensor& clean_indices, Activation activation,
                                int64_t pool, bool channels_last) {
  if (pool == 0) {
    auto a = activate(activation, activate(activation, to_opmath(z)));
    if (clean_phi_output.defined()) a.sub_(clean_phi_output);
    return a.to(z.scalar_type());
  }
  // The pool ranks phi(z), as the forward pass does (window_takes: ties where phi saturates).
  if (is_reduced_float(z))
    return noisy_difference_reduced(z, clean_phi_output, clean_indices, activation, pool,
                                    channels_last);
  const auto pooled = window_max(activate(activation, z), pool);
  const auto phi_noisy = activate(activation, std::get<0>(pooled));
  return scatter_difference("dtp_ext.noisy_difference", phi_noisy, std::get<1>(pooled),
                            clean_phi_output, clean_indices, z.sizes(), pool, 1.0, channels_last,
                            z.scalar_type());
}

at::Tensor sgd_momentum_update_cpu(at::Tensor& weight, at::Tensor& momentum_buffer,
                                   const at::Tensor& reconstruction_pairing,
                                   const at::Tensor& noise_pairing, double grad_scale,
                                   double weight_decay, double momentum, double lr) {
  if (is_reduced_float(weight)) {
    // A bfloat16/float16 weight without a float32 master: the step in float32, rounded once.
    auto w = weight.to(at::kFloat), buf = momentum_buffer.to(at::kFloat);
    auto dot = sgd_momentum_update_cpu(w, buf, reconstruction_pairing, noise_pairing, grad_scale,
                                       weight_decay, momentum, lr);
    weight.copy_(w);
    momentum_buffer.copy_(buf);
    return dot;
  }
  // The pairings may be in a lower dtype than the weight (bfloat16/float16 products, float32
  // masters): read and widened element by element in the loop, without a converted copy. The
  // pass runs in memory order over tensors of one dense layout (the weight's).
  const auto format = dense_format(weight);
  TORCH_INTERNAL_ASSERT(weight.is_contiguous(format) &&
                        momentum_buffer.strides() == weight.strides());
  const auto h = reconstruction_pairing.contiguous(format);
  const auto e = noise_pairing.defined() ? noise_pairing.contiguous(format) : at::Tensor();
  TORCH_CHECK(!e.defined() || e.scalar_type() == h.scalar_type(),
              "dtp_ext._sgd_momentum_update: the two pairings must share a dtype");
  // <V, H> - 2 <V, E>, accumulated in double per chunk, chunks summed in order.
  double dot = 0;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sgd_momentum_update_cpu", [&] {
    using weight_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, h.scalar_type(), "sgd_momentum_update_cpu_pairing", [&] {
          using pairing_t = scalar_t;
          weight_t* v = weight.mutable_data_ptr<weight_t>();
          weight_t* buf = momentum_buffer.mutable_data_ptr<weight_t>();
          const pairing_t* hp = h.const_data_ptr<pairing_t>();
          const pairing_t* ep = e.defined() ? e.const_data_ptr<pairing_t>() : nullptr;
          const auto scale = static_cast<weight_t>(grad_scale);
          const auto wd = static_cast<weight_t>(weight_decay);
          const auto mu = static_cast<weight_t>(momentum);
          const auto step = static_cast<weight_t>(lr);
          dot = at::parallel_reduce(
              0, weight.numel(), 4096, 0.0,
              [&](int64_t begin, int64_t end, double partial) {
                for (int64_t i = begin; i < end; ++i) {
                  const auto hi = static_cast<weight_t>(hp[i]);
                  const auto ei = ep ? static_cast<weight_t>(ep[i]) : weight_t(0);
                  partial += static_cast<double>(v[i]) *
                             (static_cast<double>(hi) - 2.0 * static_cast<double>(ei));
                  sgd_momentum_step(v[i], buf[i], hi, ep ? &ei : nullptr, scale, wd, mu, step);
                }
                return partial;
              },
              std::plus<double>());
        });
  });
  return at::scalar_tensor(dot, weight.options());
}

at::Tensor activation_pool_backward_cpu(const char* op, const at::Tensor& output_in,
                                        const at::Tensor& indices_in, const at::Tensor& delta_in,
                                        at::IntArrayRef out_sizes, int64_t pool,
                                        Activation activation) {
  if (is_reduced_float(output_in)) {  // in float32, rounded once at the end
    return activation_pool_backward_cpu(op, output_in.to(at::kFloat), indices_in,
                                        to_opmath(delta_in), out_sizes, pool, activation)
        .to(output_in.scalar_type());
  }
  auto output = output_in.contiguous();
  auto delta = delta_in.contiguous();
  const bool pooled = indices_in.defined();
  auto indices = pooled ? indices_in.contiguous() : at::Tensor();
  auto out = at::empty(out_sizes, output.options());
  if (output.numel() == 0) return out.zero_();  // no pooled element: nothing owns a position
  IndexGuard index_guard{op, pooled ? out.size(2) : 0, pooled ? out.size(3) : 0, pool};
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "activation_pool_backward_cpu", [&] {
    const scalar_t* s = output.const_data_ptr<scalar_t>();
    const scalar_t* d = delta.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      if (pooled) {
        // Window-owning, as on CUDA: each pooled element writes every position it owns, so the
        // CPU tests run the GPU's ownership maths. A refused index writes its window's zeros
        // (the op then raises).
        const int64_t* idx = indices.const_data_ptr<int64_t>();
        const PoolGrid grid{output.size(1), output.size(2), output.size(3),
                            out.size(2),    out.size(3),    pool};
        write_pooled_windows(o, output.size(0), grid, /*channels_last=*/false,
                             [&](int64_t, int64_t, int64_t oh, int64_t ow, int64_t j) {
                               const int64_t at_max = index_guard.ok(idx[j], oh, ow) ? idx[j] : -1;
                               return owned_values<scalar_t>(
                                   at_max, activation_backward<kAct>(d[j], s[j]), -1,
                                   static_cast<const scalar_t*>(nullptr), scalar_t(1));
                             });
        index_guard.check();
      } else {
        at::parallel_for(0, output.numel(), 2048, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) o[i] = activation_backward<kAct>(d[i], s[i]);
        });
      }
    });
  });
  return out;
}

// On the CPU, oneDNN's convolutions on large maps run markedly faster on channels-last tensors
// (the three products L-DRL needs) even counting the layout conversions, and still faster at
// 8x8 maps; at 4x4 NCHW is as fast or faster (benchmarks/RESULTS.md, Kernel choices). Output
// maps with at least this many positions run channels-last.
constexpr int64_t kChannelsLastMinPositions = 64;

const bool kCpuLayoutRegistered = register_channels_last_rule(
    c10::DeviceType::CPU, [](int64_t positions) { return positions >= kChannelsLastMinPositions; });

}  // namespace
}  // namespace dtp_ext

TORCH_LIBRARY_IMPL(dtp_ext, CPU, m) {
  dtp_ext::schema::register_elementwise_kernels<
      &dtp_ext::phi_unpool_difference_cpu, &dtp_ext::noisy_difference_cpu,
      &dtp_ext::sgd_momentum_update_cpu, &dtp_ext::activation_pool_backward_cpu>(m);
}
