// AVX-512 forms of the CPU's channels-last pooled passes for 2x2 pools (csrc/cpu/
// elementwise_cpu.cpp): in a channels-last map a window's four positions are whole channel
// vectors, so each register holds 16 channels of one window (ranks looked up with gathers, the
// owned differences as masked adds, bfloat16 rounding by c10::BFloat16's rule). They give the
// scalar passes' results bit for bit (tests/test_pooled_passes.py runs both on the same input)
// and run where the CPU has AVX-512 F/BW/VL, unless switched off.
#pragma once

#include <cstdint>

namespace dtp_ext {

// Whether this CPU has what the kernels use (AVX-512 F, BW and VL).
bool vector_windows_supported();
// Whether the passes take them (supported and switched on; on by default).
bool vector_windows_enabled();
// Switches them on or off (tests compare both forms); returns the previous setting.
bool set_vector_windows(bool enabled);
// Windows the kernels have written since the library loaded (the passes add their counts):
// what tells a test, or a user, that they ran.
void count_vector_windows(int64_t windows);
int64_t vector_windows_written();

// One 2x2 window of channels-last maps, 16 channels at a time. Strides in elements.
struct Window2x2 {
  int64_t channels;  // between a position and the next column's (= the channel count)
  int64_t row;       // between a position and the next row's (= width * channels)
  int64_t first;     // the window's first position in its plane (what pool indices address)
  int64_t width;     // the plane's width
  int64_t pooled;    // positions of the pooled grid: the channel stride of NCHW pooled terms
};

// The bfloat16 noisy difference of one window (noisy_window's maths): z (bfloat16 bits) ranked by
// phi[z] (max-pool's rule), the winner's phi_of_phi[z], minus clean where clean_idx puts it
// (clean and clean_idx at the window's pooled element of channel 0, `pooled` apart; null: no
// clean term), rounded to bfloat16 bits in out. False when a clean index is not in the window:
// the caller's scalar pass then rewrites the window and refuses the index.
bool noisy_window_2x2_bf16(const uint16_t* z, const float* phi, const float* phi_of_phi,
                           const float* clean, const int64_t* clean_idx, const Window2x2& w,
                           uint16_t* out);

// scale * (a at a_idx - b at b_idx) over one window (owned_difference's maths; b null: no second
// term), a/b and their indices as clean above; out float32, or bfloat16 bits. False as above.
bool scatter_window_2x2(const float* a, const int64_t* a_idx, const float* b, const int64_t* b_idx,
                        float scale, const Window2x2& w, float* out);
bool scatter_window_2x2(const float* a, const int64_t* a_idx, const float* b, const int64_t* b_idx,
                        float scale, const Window2x2& w, uint16_t* out);

}  // namespace dtp_ext
