// CPU kernels of the chunk pass's structural ops (graph/row_ops.hpp): plain row copies, any dtype.
// Rows the memory planner laid out as views are already where they belong: nothing is copied.
#include <cstring>
#include <utility>

#include "graph/row_ops.hpp"
#include "ops/kernel_registry.hpp"

namespace moeflow {

namespace {

void copy_rows(void* dst, const void* src, int64_t bytes) {
  if (dst != src && bytes > 0) std::memcpy(dst, src, static_cast<std::size_t>(bytes));
}

}  // namespace

void register_row_kernels(KernelRegistry& r) {
  for (const auto& [kind, what] : {std::pair{"slice_rows", "one copy of the chunk's rows"},
                                    std::pair{"concat_rows", "one copy per chunk"}}) {
    KernelEntry e{kind, Backend::cpu, "cpu.copy_rows", 0,
                  [what](const Graph&, const Node&) { return Support::yes(what); },
                  [](const KernelCall& c) { copy_chunk_rows(c.graph, c.node, c.inputs, c.outputs, c.tokens, copy_rows); },
                  {}};
    e.row_views = true;
    r.add(std::move(e));
  }
}

}  // namespace moeflow
