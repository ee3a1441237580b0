#pragma once
// The routed experts' SwiGLU MLP through CUTLASS 4.2's Hopper pointer-array grouped GEMM (TMA loads,
// warp-specialised cooperative mainloop, bf16 in, fp32 accumulation, bf16 out). One group per
// expert; a small device kernel writes every group's problem size and pointers from the DEVICE
// offsets, so nothing waits on the host and one captured CUDA graph serves any routing and any T up
// to the plan's maximum. Experts with no rows are groups with no tiles.
//
// Conventions as in cublas_gemm.hpp: rows [R, H] grouped by expert (offsets [E+1], device),
// w13 [E, 2I, H], w2 [E, H, I], out [R, H]; h [R, 2I] and act [R, I] are the caller's scratch, rounded
// to bf16 between the stages; total_rows = R = T·k bounds the SwiGLU between them, which covers the
// routed rows [0, offsets[E]). Rows past offsets[E] (ids outside [0, E)) belong to no group and are
// left as they are: the permutation gives them no slot, so the combine never reads them. No CUDA or
// CUTLASS headers here.
#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

// Empty when the kernel can run H x I experts on `device`; otherwise why not (built without CUTLASS,
// not a Hopper GPU, sizes that are not multiples of the 16-byte TMA alignment).
std::string cutlass_grouped_unsupported(int hidden, int intermediate);
// The same question without a device (plan time, CI): compiled in, and sizes aligned.
std::string cutlass_grouped_unbuildable(int hidden, int intermediate);

// Device workspace: the two GEMMs' problem-size, pointer and stride arrays and CUTLASS's own
// workspace (its per-SM TMA descriptors). 256-byte aligned.
std::size_t cutlass_grouped_workspace_bytes(int experts);

// Tile configurations: general = 128x128x64 tiles, one CTA per cluster (any expert size); wide =
// 128x256x64 tiles in 2x1 clusters, for experts of hundreds of rows (each weight tile loaded once
// for two row tiles, multicast over the cluster); narrow = 64x256x64 tiles, ping-pong, one CTA per
// cluster (an expert's rows padded to 64, not 128 or 256); wide_single = 128x256x64 tiles, one CTA
// per cluster (rows padded to 128, no multicast); narrow_pair = the narrow tiles in 2x1 clusters (each
// weight tile multicast to two 64-row tiles; an expert's rows padded to 128).
enum class CutlassTiles { general, wide, narrow, wide_single, narrow_pair };

// With `w13_packed` (w13 as pack_w13_interleaved wrote it; the 256-column tiles only), GEMM 1
// applies SwiGLU in its epilogue and writes act directly: h is not touched (it may be null) and no
// SwiGLU kernel runs. The result is bit for bit the unfused one of the same tiles.
void experts_cutlass_grouped(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                             int64_t total_rows, int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2, uint16_t* h,
                             uint16_t* act, uint16_t* out, void* workspace, CutlassTiles tiles = CutlassTiles::general,
                             const uint16_t* w13_packed = nullptr);

// w13 [E, 2I, H] rearranged for the SwiGLU epilogue: per expert, blocks of 2·kSwigluHalf rows, the gate
// rows of kSwigluHalf features and then the up rows of the same features, so that one 256-column
// tile of GEMM 1 holds both halves of its features; I is padded with zero rows to whole blocks.
// Written once, when the weights are bound (KernelEntry::packed_weight), never on a run.
constexpr int kSwigluHalf = 128;
int64_t packed_w13_features(int intermediate);  // I rounded up to kSwigluHalf
int64_t packed_w13_bytes(int experts, int hidden, int intermediate);
void pack_w13_interleaved(const uint16_t* w13, int experts, int hidden, int intermediate, uint16_t* packed,
                          Stream stream);

// The box one k-block of a weight tile is: 256 rows (the tile's columns of D) × 64 of K.
constexpr int kWeightTileRows = 256, kWeightTileCols = 64;
// The experts' weights packed once, at bind time, tile by tile for the 256-column tiles
// (cutlass_weight_tiles.cuh): w13 in pack_w13_interleaved's order, then w2, each as
// [E, rows / 256, K / 64, 256, 64] (rows and K padded with zeros), so that every weight tile a
// k-block loads is one contiguous 32 KB. One buffer of weight_tiles_bytes.
int64_t weight_tiles_bytes(int experts, int hidden, int intermediate);
void pack_weight_tiles(const uint16_t* w13, const uint16_t* w2, int experts, int hidden, int intermediate,
                       uint16_t* packed, Stream stream);
// experts_cutlass_grouped with the SwiGLU epilogue, both GEMMs reading the packed tiles (`tiles`:
// narrow, narrow_pair or wide_single). w2 is only named for the groups' arrays (not read). Same
// workspace.
void experts_cutlass_weight_tiles(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                                  int hidden, int intermediate, const uint16_t* weight_tiles, const uint16_t* w2,
                                  uint16_t* act, uint16_t* out, void* workspace, CutlassTiles tiles);

// The routed experts' MLP with GEMM 1 gathering its rows from the tokens themselves
// (cutlass_gather_rows.cuh): permuted row r is x[row_source[r] / top_k], copied straight into the
// tile, so no permuted copy of x is written or read back (the dispatch's scatter). SwiGLU in GEMM 1's
// epilogue, on the 64x256 tiles (`tiles` narrow, two copying warps) or the 128x256 ones (wide_single,
// three copying warps; w13 packed once only). w13 is the packed copy: pack_weight_tiles' where
// `weight_tiles` (both GEMMs then read the tiles; w2 is only named), else pack_w13_interleaved's. Bit
// for bit experts_cutlass_weight_tiles / experts_cutlass_grouped (fused) on the same tiles.
// offsets [E + 1] and row_source [T·k] as build_permutation writes them; act [T·k, I] and out
// [T·k, H] as in experts_cutlass_grouped; workspace of cutlass_grouped_workspace_bytes(experts).
struct GatheredRows {
  const uint16_t* x = nullptr;          // [T, H], the layer's input as it is
  const int32_t* row_source = nullptr;  // [T·k]: the flat index t·k + j each permuted row holds
  int top_k = 0;
};
void experts_cutlass_gathered(const LaneContext& ctx, const GatheredRows& rows, const int32_t* offsets, int experts,
                              int hidden, int intermediate, const uint16_t* w13_packed, bool weight_tiles,
                              const uint16_t* w2, uint16_t* act, uint16_t* out, void* workspace, CutlassTiles tiles);

}  // namespace moeflow::cuda
