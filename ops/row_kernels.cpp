// CPU kernels of the chunk pass's structural ops (graph/row_ops.hpp): plain row copies, any dtype.
#include <cstring>

#include "graph/row_ops.hpp"
#include "ops/kernel_registry.hpp"

namespace moeflow {

void register_row_kernels(KernelRegistry& r) {
  r.add({"slice_rows", Backend::cpu, "cpu.copy_rows", 0,
         [](const Graph&, const Node&) { return Support::yes("one copy of the chunk's rows"); },
         [](const KernelCall& c) {
           const auto& op = static_cast<const SliceRowsOp&>(*c.node.op);
           const int64_t row_bytes = c.input_value(0).bytes(1);
           std::memcpy(c.outputs[0], static_cast<const std::byte*>(c.inputs[0]) + op.chunk() * op.rows() * row_bytes,
                       static_cast<std::size_t>(c.tokens * row_bytes));
         },
         {}});
  r.add({"concat_rows", Backend::cpu, "cpu.copy_rows", 0,
         [](const Graph&, const Node&) { return Support::yes("one copy per chunk"); },
         [](const KernelCall& c) {
           const auto& op = static_cast<const ConcatRowsOp&>(*c.node.op);
           const int64_t row_bytes = c.input_value(0).bytes(1);
           for (std::size_t i = 0; i < c.inputs.size(); ++i)
             std::memcpy(static_cast<std::byte*>(c.outputs[0]) + static_cast<int64_t>(i) * op.rows() * row_bytes,
                         c.inputs[i], static_cast<std::size_t>(c.input_value(i).tokens_in(c.tokens) * row_bytes));
         },
         {}});
}

}  // namespace moeflow
