#pragma once
// The host's arithmetic ceiling, as the roofline floor needs it: every thread of the caller's oneTBB
// arena runs its own large single-threaded SGEMM (as the CPU kernels do), on random data.
namespace moeflow::cpu {

// Median FLOP/s over a few repetitions, summed over the arena's threads.
double measure_sgemm_flops();

}  // namespace moeflow::cpu
