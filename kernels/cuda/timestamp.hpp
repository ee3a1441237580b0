#pragma once
// Device-side timestamps: a one-thread kernel that writes the GPU's global nanosecond timer, so a
// captured CUDA graph can time its own nodes (events recorded during capture become graph nodes
// that cannot be timed). Each stamp is a launch of its own and shifts what it measures by about that.
#include <cstdint>

#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

// *slot = %globaltimer (ns) when the kernel runs on `s`.
void record_global_time(uint64_t* slot, Stream s);

}  // namespace moeflow::cuda
