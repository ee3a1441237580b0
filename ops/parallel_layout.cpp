#include "ops/parallel_layout.hpp"

#include <algorithm>
#include <numeric>

#include "graph/error.hpp"

namespace moeflow {

const char* to_string(DispatchKind k) {
  switch (k) {
    case DispatchKind::allgather: return "allgather";
    case DispatchKind::topk_allgather: return "topk-allgather";
    case DispatchKind::alltoall: return "alltoall";
  }
  return "?";
}

DispatchKind parse_dispatch(const std::string& text) {
  for (DispatchKind k : {DispatchKind::allgather, DispatchKind::topk_allgather, DispatchKind::alltoall})
    if (text == to_string(k)) return k;
  fail_input("--dispatch '" + text + "': expected allgather, topk-allgather or alltoall");
}

const char* to_string(TpDispatch k) { return k == TpDispatch::slices ? "slices" : "leader"; }

TpDispatch parse_tp_dispatch(const std::string& text) {
  if (text == "slices") return TpDispatch::slices;
  if (text == "leader") return TpDispatch::leader;
  fail_input("--tp-dispatch '" + text + "': expected slices (sequence-parallel) or leader");
}

int64_t ParallelLayout::max_tokens() const { return *std::max_element(tokens.begin(), tokens.end()); }

int64_t ParallelLayout::first_token(int d) const {
  return std::accumulate(tokens.begin(), tokens.begin() + d, int64_t{0});
}

int64_t ParallelLayout::tp_share_first(int64_t rows, int j) const {
  if (tp_dispatch == TpDispatch::leader) return 0;
  const int64_t per = (rows + tp - 1) / tp;
  return std::min<int64_t>(rows, per * j);
}

int64_t ParallelLayout::tp_share_rows(int64_t rows, int j) const {
  if (tp_dispatch == TpDispatch::leader) return j == 0 ? rows : 0;
  const int64_t per = (rows + tp - 1) / tp;
  return std::clamp<int64_t>(rows - per * j, 0, per);
}

std::string ParallelLayout::str() const {
  std::string s = "dp=" + std::to_string(dp) + " tp=" + std::to_string(tp) + (ep ? " ep " : " ") + to_string(dispatch);
  if (tp > 1) s += std::string(" tp-dispatch=") + to_string(tp_dispatch);
  s += " tokens ";
  for (std::size_t i = 0; i < tokens.size(); ++i) s += (i ? "," : "") + std::to_string(tokens[i]);
  return s;
}

void check_layout(ParallelLayout& l, const MoEConfig& c, int world_size) {
  if (l.dp < 1 || l.tp < 1)
    fail_input("--dp " + std::to_string(l.dp) + " --tp " + std::to_string(l.tp) + ": both must be >= 1");
  if (l.world() != world_size)
    fail_input("--dp " + std::to_string(l.dp) + " x --tp " + std::to_string(l.tp) + " = " + std::to_string(l.world()) +
               " ranks, but mpirun started " + std::to_string(world_size));
  if (l.tokens.size() == 1) l.tokens.assign(static_cast<std::size_t>(l.dp), l.tokens[0]);
  if (static_cast<int>(l.tokens.size()) != l.dp)
    fail_input("--tokens gives " + std::to_string(l.tokens.size()) + " counts for " + std::to_string(l.dp) +
               " DP ranks: give one count, or one per DP rank");
  for (int64_t t : l.tokens)
    if (t < 1) fail_input("--tokens: a DP rank's token count must be >= 1, got " + std::to_string(t));
  const int w = l.world();
  if (l.ep && c.experts % w != 0)
    fail_input(c.name + ": " + std::to_string(c.experts) + " experts do not divide over " + std::to_string(w) +
               " ranks (--ep splits the experts evenly)");
  if (!l.ep && c.intermediate % w != 0)
    fail_input(c.name + ": expert intermediate size " + std::to_string(c.intermediate) + " does not divide over " +
               std::to_string(w) + " ranks (without --ep every expert's I is split evenly)");
}

}  // namespace moeflow
