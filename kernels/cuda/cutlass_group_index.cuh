#pragma once
// For CUTLASS Hopper pointer-array mainloops whose `load` replaces CUTLASS's and needs the group (the
// expert) it loads for: the kernel passes `load` a block coordinate without the group, so the group
// rides along in the load inputs, CUTLASS's (A, B) tiled views plus its index, which
// tensors_perform_update sets whenever the kernel moves to another group. Derive from
// WithGroupIndex<Collective> and read cute::get<2>(load_inputs).
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"

namespace moeflow::cuda::cutlass_detail {

template <class Base>
struct WithGroupIndex : Base {
  template <class ProblemShape_MNKL, class Params>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    auto base = Base::load_init(problem_shape_MNKL, params);
    return cute::make_tuple(cute::get<0>(base), cute::get<1>(base), int32_t{0});
  }

  template <class InputTensors, class Params, class ProblemShape_MNKL>
  CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& inputs, Params const&, ProblemShape_MNKL,
                                                     int32_t next_group) {
    return cute::make_tuple(cute::get<0>(inputs), cute::get<1>(inputs), next_group);
  }
};

}  // namespace moeflow::cuda::cutlass_detail
