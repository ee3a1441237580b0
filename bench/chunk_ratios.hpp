#pragma once
// What chunking costs, read off a sweep (`moeflow bench --chunks 1,2,4`): for each point (scope,
// preset, T) and chunk count, the best row's time (over the plans and experts kernels measured) over
// the best unchunked row's, pass by pass, and the median over the passes. Best against best is the
// question a user asks ("is the chunked layer as fast as the unchunked one can be?"); a row against
// the unchunked row of its own plan would credit chunking for a plan that is slow unchunked.
//
// Every chunk re-reads its touched experts' weights and pads each one's rows to a GEMM tile, so the
// ratio is printed beside the fewest rows a touched expert keeps within one chunk: the condition
// under which a chunked layer is expected to keep the unchunked pace (issue 5: ≤ 1.05 where every
// chunk keeps ≥ 512 rows per touched expert).
#include <cstdint>
#include <iosfwd>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moeflow {

struct ChunkRatio {
  nlohmann::json point;              // scope, preset, T
  int chunks = 0;                    // > 1
  std::vector<double> per_pass;      // best chunked / best unchunked time, each pass that measured both
  double median = 0.0;               // of per_pass (an even count: the mean of the middle two)
  double low = 0.0, high = 0.0;      // of per_pass
  int64_t fewest_expert_rows = 0;    // the fewest over the chunked rows (0: none, as fewer_rows counts)
  std::string best;                  // plan and experts kernel of the best chunked row, most often over the passes
};

// `passes`: each pass's rows (bench rows: scope, preset, T, chunks, plan, time_us, and where known
// experts_kernel and fewest_expert_rows), in the order measured. A point and chunk count with no
// unchunked row in a pass gets nothing from that pass; one with none in any pass is left out.
std::vector<ChunkRatio> chunk_ratios(const std::vector<std::vector<nlohmann::json>>& passes);

// One line per point and chunk count (nothing where the sweep measured no chunked point).
void print_chunk_ratios(const std::vector<ChunkRatio>& ratios, std::ostream& out);

}  // namespace moeflow
