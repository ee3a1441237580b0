// CPU kernels of the chunk pass's structural ops (graph/row_ops.hpp): plain row copies, any dtype.
// Rows the memory planner laid out as views are already where they belong: nothing is copied.
#include <cstring>

#include "graph/row_ops.hpp"
#include "ops/kernel_registry.hpp"

namespace moeflow {

namespace {

void copy_rows(void* dst, const void* src, int64_t bytes) {
  if (dst != src && bytes > 0) std::memcpy(dst, src, static_cast<std::size_t>(bytes));
}

}  // namespace

void register_row_kernels(KernelRegistry& r) {
  KernelEntry slice{"slice_rows", Backend::cpu, "cpu.copy_rows", 0,
                    [](const Graph&, const Node&) { return Support::yes("one copy of the chunk's rows"); },
                    [](const KernelCall& c) {
                      const auto& op = static_cast<const SliceRowsOp&>(*c.node.op);
                      const int64_t row_bytes = c.input_value(0).bytes(1);
                      copy_rows(c.outputs[0], static_cast<const std::byte*>(c.inputs[0]) + op.first_byte(row_bytes),
                                c.tokens * row_bytes);
                    },
                    {}};
  slice.row_views = true;
  r.add(std::move(slice));
  KernelEntry concat{"concat_rows", Backend::cpu, "cpu.copy_rows", 0,
                     [](const Graph&, const Node&) { return Support::yes("one copy per chunk"); },
                     [](const KernelCall& c) {
                       const auto& op = static_cast<const ConcatRowsOp&>(*c.node.op);
                       const int64_t row_bytes = c.input_value(0).bytes(1);
                       for (std::size_t i = 0; i < c.inputs.size(); ++i)
                         copy_rows(static_cast<std::byte*>(c.outputs[0]) + op.first_byte(static_cast<int>(i), row_bytes),
                                   c.inputs[i], c.input_value(i).tokens_in(c.tokens) * row_bytes);
                     },
                     {}};
  concat.row_views = true;
  r.add(std::move(concat));
}

}  // namespace moeflow
