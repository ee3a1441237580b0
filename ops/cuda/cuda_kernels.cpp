// The CUDA kernels of every op (bf16 storage, fp32 accumulation), with their priorities, supports()
// and the reason each gives the plan. Built only with MOEFLOW_CUDA.
#include <cuda_runtime.h>

#include <functional>
#include <iomanip>
#include <limits>
#include <sstream>
#include <vector>

#include "kernels/cuda/check.cuh"
#include "kernels/cuda/cublas_gemm.hpp"
#include "kernels/cuda/cutlass_grouped.hpp"
#include "kernels/cuda/decode_experts.hpp"
#include "kernels/cuda/elementwise.hpp"
#include "kernels/cuda/fused_decode.hpp"
#include "kernels/cuda/fused_single_token.hpp"
#include "kernels/cuda/lane_context.hpp"
#include "kernels/cuda/permute.hpp"
#include "kernels/cuda/routing.hpp"
#include "graph/row_ops.hpp"
#include "ops/combine_op.hpp"
#include "ops/dispatch_op.hpp"
#include "ops/experts_op.hpp"
#include "ops/fused_experts_op.hpp"
#include "ops/gate_op.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/shared_expert_op.hpp"

namespace moeflow {

namespace {

const cuda::LaneContext& lane(const KernelCall& c) { return *static_cast<const cuda::LaneContext*>(c.lane); }
const uint16_t* bf16_in(const KernelCall& c, std::size_t i) { return c.in<uint16_t>(i); }
uint16_t* bf16_out(const KernelCall& c, std::size_t i) { return c.out<uint16_t>(i); }
int hidden_of(const KernelCall& c) { return static_cast<int>(c.input_value(0).shape()[1].fixed); }
constexpr int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

// The entry with its launch count set (see KernelEntry::launches): the positional registrations
// below stay readable without spelling out every optional member before it.
KernelEntry launching(int launches, KernelEntry e) {
  e.launches = launches;
  return e;
}

// Programmatic dependent launch (KernelEntry::releases_next / starts_early; dependent_launch.cuh).
KernelEntry releasing_next(KernelEntry e) {
  e.releases_next = true;
  return e;
}
KernelEntry starting_early(KernelEntry e, std::function<bool(const Graph&, const Node&)> where) {
  e.starts_early = std::move(where);
  return e;
}

// A kernel that sizes its launches for the plan's maximum T and reads the live T from the device
// when KernelCall::live_tokens is set (one captured graph for any T).
KernelEntry reading_live_tokens(KernelEntry e) {
  e.live_tokens = true;
  return e;
}

// Activations and weights in bf16 (gate bias, routing weights and logits stay fp32).
// `how` says what the kernel does when it can run the node.
Support cuda_supports_bf16(const Graph& g, const Node& n, const std::string& how) {
  for (const auto* list : {&n.inputs, &n.outputs})
    for (ValueId id : *list) {
      const Value& v = g.value(id);
      if (v.dtype() == DType::f32 && v.shape().rank() >= 2 && v.shape()[v.shape().rank() - 1].fixed > 64 &&
          n.op->kind() != "gate" && n.op->kind() != "combine")
        return Support::no("CUDA kernels store activations in bf16; '" + v.name + "' is " + v.type_str());
    }
  return Support::yes(how);
}

// supports() for a kernel whose only requirement is bf16 storage.
std::function<Support(const Graph&, const Node&)> bf16_kernel(std::string how) {
  return [how = std::move(how)](const Graph& g, const Node& n) { return cuda_supports_bf16(g, n, how); };
}

double rows_per_expert(const Node& n, int64_t tokens) {
  const auto& op = static_cast<const ExpertsOp&>(*n.op);
  return static_cast<double>(tokens) * op.top_k() / op.experts();
}

std::string fmt(double v) {
  std::ostringstream o;
  o.precision(v < 10 ? 2 : 0);
  o << std::fixed << v;
  return o.str();
}

// Experts this large (mixtral-8x7b's 336 MiB) make every experts kernel a weight stream, and at few
// rows per expert cuBLAS streams them faster than our kernels (H100, experts path, × floor: mixtral
// T = 8 / 32 / 128, cuBLAS grouped 1.09 / 1.10 / 1.13 against CUTLASS 1.19-1.24; `moeflow tune`
// output in bench/results/h100_tune_2026-11-22.txt). The fused decode kernel keeps the same bound:
// measured with no rule (experts path, CUDA graph, × floor, fused against the chain's decode kernels,
// `h100_fused_decode_dynamic_unrestricted_2026-11-22.jsonl`), it was faster wherever T·k <= E on
// qwen1.5, qwen3 and deepseek-v3 (qwen3 T = 1, 2, 4, 8, 16: 1.70 1.31 1.17 1.11 1.10 against 2.15
// 1.60 1.35 1.22 1.17) and slower on mixtral (T = 1, 2: 1.37 1.10 against 1.28 1.02), whose second
// phase gets too few, too large items to fill the GPU.
constexpr int64_t kHugeExpertBytes = int64_t{128} << 20;
// A shared expert is folded into the fused decode kernel where its weights are at least this share of
// the routed experts' expected touched weights. Measured on the H100 (whole layer, concurrent plan,
// CUDA-graph replays, folded against --no-fold-shared, bench/results/h100_fold_shared_2026-11-23.txt):
// qwen1.5-moe-a2.7b (share 1.0 / 0.5 / 0.27 at T = 1 / 2 / 4) 80.7 / 105.2 / 150.9 against 92.5 /
// 118.5 / 157.8 µs; deepseek-v3 (share 0.125 at T=1, less beyond) 295.2 / 526.2 / 934.8 against
// 294.8 / 525.5 / 925.4: its 88 MB already hid beside 704 MB of routed weights.
constexpr double kFoldSharedBytes = 0.25;
int64_t expert_bytes(int64_t hidden, int intermediate) { return 3 * hidden * static_cast<int64_t>(intermediate) * 2; }
bool huge_experts(int64_t hidden, int intermediate) { return expert_bytes(hidden, intermediate) > kHugeExpertBytes; }
// The same question of an experts node (H from its rows input).
bool huge_experts(const Graph& g, const Node& n) {
  return huge_experts(g.value(n.inputs[0]).shape()[1].fixed, static_cast<const ExpertsOp&>(*n.op).intermediate());
}
std::string expert_mib(int64_t hidden, int intermediate) {
  return std::to_string(expert_bytes(hidden, intermediate) >> 20) + " MiB per expert";
}

// Huge experts with a thousand rows each or more on average at the maximum T: the per-expert
// loop's exact sizes beat padding to the largest expert (measurements at its registration).
bool exact_sizes_pay(const Graph& g, const Node& n) {
  return huge_experts(g, n) && rows_per_expert(n, g.max_tokens_of(n)) >= 1024;
}

// act [R, I] in bf16: the scratch between the two GEMMs of the experts strategies.
int64_t act_scratch_bytes(const Node& n, int64_t tokens) {
  const auto& op = static_cast<const ExpertsOp&>(*n.op);
  return align256(tokens * op.top_k() * op.intermediate() * 2);
}
// h [R, 2I] and act [R, I] in bf16 for the experts strategies that run on the permuted rows.
int64_t experts_scratch_bytes(const Node& n, int64_t tokens) {
  const auto& op = static_cast<const ExpertsOp&>(*n.op);
  return align256(tokens * op.top_k() * 2 * op.intermediate() * 2) + act_scratch_bytes(n, tokens);
}

// Where the bf16 scratch h [R, 2I] and act [R, I] sit in a workspace sized for the plan's maximum T.
void experts_scratch(const KernelCall& c, std::byte* workspace, uint16_t*& h, uint16_t*& act) {
  const auto& op = static_cast<const ExpertsOp&>(*c.node.op);
  const int64_t rows = c.max_tokens() * op.top_k();
  h = reinterpret_cast<uint16_t*>(workspace);
  act = reinterpret_cast<uint16_t*>(workspace + align256(rows * 2 * op.intermediate() * 2));
}

// The grouped strategy's device workspace (scratch, then its pointer arrays) and pinned host scratch.
int64_t grouped_workspace_bytes(const Node& n, int64_t tokens) {
  return experts_scratch_bytes(n, tokens) +
         align256(static_cast<int64_t>(cuda::grouped_pointer_bytes(static_cast<const ExpertsOp&>(*n.op).experts())));
}
int64_t grouped_host_bytes(const Graph&, const Node& n, int64_t) {
  return static_cast<int64_t>(cuda::grouped_pointer_bytes(static_cast<const ExpertsOp&>(*n.op).experts()));
}

// Runs the grouped strategy with its workspace starting at `workspace`.
void run_grouped(const KernelCall& c, std::byte* workspace) {
  const auto& op = static_cast<const ExpertsOp&>(*c.node.op);
  uint16_t *h, *act;
  experts_scratch(c, workspace, h, act);
  std::byte* pointers = workspace + experts_scratch_bytes(c.node, c.max_tokens());
  cuda::experts_grouped_batched(lane(c), bf16_in(c, 0), c.in<int32_t>(1), op.experts(), hidden_of(c),
                                op.intermediate(), bf16_in(c, 2), bf16_in(c, 3), h, act, bf16_out(c, 0), pointers,
                                c.host_workspace);
}

// A CUTLASS grouped GEMM configuration as an experts kernel. It runs experts that get at least
// `min_rows` rows on average at the maximum T (fewer, its tiles would run mostly empty), and huge
// ones (huge_experts()) from `huge_min_rows`. Among the configurations, each is preferred over a
// range of mean rows per expert (its priority there; `elsewhere` outside it), so a forced one still
// runs wherever it can.
struct RowRange {
  double min_rows = 0;
  double huge_min_rows = 0;
  double preferred_from = 0;
  double preferred_to = std::numeric_limits<double>::infinity();
  int elsewhere = 0;  // the priority outside [preferred_from, preferred_to)
  bool preferred_on_huge = true;  // false: `elsewhere` on huge experts (huge_experts()) whatever the rows
};

// E, H and I of an experts node or of the fused node made from its chain (routed_experts(); H: input
// 0's columns, the permuted rows' or x's).
struct ExpertSizes {
  int experts, hidden, intermediate;
};
ExpertSizes expert_sizes(const Graph& g, const Node& n) {
  const RoutedExperts r = *routed_experts(n);
  return {r.experts, static_cast<int>(g.value(n.inputs[0]).shape()[1].fixed), r.intermediate};
}

// The experts' weights packed once at bind time, keyed on w13 (input `w13_input`, w2 the next one):
// w13 for the SwiGLU epilogue (cuda::pack_w13_interleaved), or with `weight_tiles` w13 so and w2 tile
// by tile in one copy (cuda::pack_weight_tiles). `twin` runs without the copy.
PackedWeight packed_expert_weights(int w13_input, bool weight_tiles, std::string twin) {
  const std::string interleaved = "w13 gate/up interleaved by " + std::to_string(cuda::kSwigluHalf) + " rows";
  return PackedWeight{
      w13_input, weight_tiles ? interleaved + ", then w2, in 256x64 tiles" : interleaved,
      [weight_tiles](const Graph& g, const Node& n) {
        const ExpertSizes s = expert_sizes(g, n);
        return weight_tiles ? cuda::weight_tiles_bytes(s.experts, s.hidden, s.intermediate)
                            : cuda::packed_w13_bytes(s.experts, s.hidden, s.intermediate);
      },
      [w13_input, weight_tiles](const KernelCall& c, void* packed) {
        const ExpertSizes s = expert_sizes(c.graph, c.node);
        auto* out = static_cast<uint16_t*>(packed);
        if (weight_tiles)
          cuda::pack_weight_tiles(bf16_in(c, w13_input), bf16_in(c, w13_input + 1), s.experts, s.hidden, s.intermediate,
                                  out, lane(c).stream);
        else
          cuda::pack_w13_interleaved(bf16_in(c, w13_input), s.experts, s.hidden, s.intermediate, out, lane(c).stream);
      },
      std::move(twin)};
}

// With `swiglu_twin` (the 256-column tiles only: the kernel of the same tiles without the epilogue),
// GEMM 1 applies SwiGLU in its epilogue from w13 packed once at bind time (cuda::pack_w13_interleaved):
// no h [R, 2I] written and read back, no SwiGLU launch; the scratch is act [R, I] alone.
// With `weight_tiles` as well (the 256-column tiles only), w13 and w2 are packed once tile by tile
// (cuda::pack_weight_tiles, one copy of both): every weight tile a k-block loads is one contiguous
// 32 KB instead of 256 rows of 128 bytes 2·K bytes apart (measured where they are registered).
KernelEntry cutlass_grouped(std::string name, int priority, cuda::CutlassTiles tiles, RowRange range,
                            std::string tiles_text, std::string swiglu_twin = {}, bool weight_tiles = false) {
  const bool swiglu_epilogue = !swiglu_twin.empty();
  auto scratch_bytes = [swiglu_epilogue](const Node& n, int64_t tokens) {
    return swiglu_epilogue ? act_scratch_bytes(n, tokens) : experts_scratch_bytes(n, tokens);
  };
  if (swiglu_epilogue) tiles_text += ", SwiGLU in GEMM 1's epilogue from w13 packed once";
  if (weight_tiles) tiles_text += ", w13 and w2 packed once tile by tile (each weight tile one contiguous 32 KB)";
  KernelEntry e = reading_live_tokens(launching(swiglu_epilogue ? 3 : 4, {"experts", Backend::cuda, std::move(name), priority,
      [range, tiles_text, swiglu_epilogue, weight_tiles](const Graph& g, const Node& n) {
        Support s = cuda_supports_bf16(g, n, "");
        if (!s.ok) return s;
        const auto& op = static_cast<const ExpertsOp&>(*n.op);
        const int64_t H = g.value(n.inputs[0]).shape()[1].fixed;
        if (const std::string why = cuda::cutlass_grouped_unbuildable(static_cast<int>(H), op.intermediate()); !why.empty())
          return Support::no(why);
        if (swiglu_epilogue && g.value(n.inputs[2]).role != ValueRole::weight)
          return Support::no("w13 ('" + g.value(n.inputs[2]).name + "') is not a weight bound once, so it cannot be packed once");
        if (weight_tiles && g.value(n.inputs[3]).role != ValueRole::weight)
          return Support::no("w2 ('" + g.value(n.inputs[3]).name + "') is not a weight bound once, so it cannot be packed once");
        const double mean = rows_per_expert(n, g.max_tokens_of(n));
        if (mean < range.min_rows)
          return Support::no(fmt(mean) + " rows/expert at max T: fewer than the " + fmt(range.min_rows) + " its tiles want");
        if (mean < range.huge_min_rows && huge_experts(H, op.intermediate()))
          return Support::no(fmt(mean) + " rows/expert at max T on " + expert_mib(H, op.intermediate()) +
                             ": cuBLAS's GEMMs stream such experts faster at few rows");
        return Support::yes(fmt(mean) + " rows/expert at max T -> CUTLASS Hopper grouped GEMM, " + tiles_text +
                            ", one group per expert sized on the device from the offsets (no host sync, capturable)");
      },
      [tiles, swiglu_epilogue, scratch_bytes, weight_tiles](const KernelCall& c) {
        const auto& op = static_cast<const ExpertsOp&>(*c.node.op);
        uint16_t *h = nullptr, *act;
        auto* ws = static_cast<std::byte*>(c.workspace);
        if (swiglu_epilogue) act = reinterpret_cast<uint16_t*>(ws);
        else experts_scratch(c, ws, h, act);
        if (swiglu_epilogue && c.packed == nullptr) fail_input("node '" + c.node.name + "': w13 was not packed");
        if (weight_tiles)
          return cuda::experts_cutlass_weight_tiles(lane(c), bf16_in(c, 0), c.in<int32_t>(1), op.experts(), hidden_of(c),
                                                    op.intermediate(), static_cast<const uint16_t*>(c.packed),
                                                    bf16_in(c, 3), act, bf16_out(c, 0),
                                                    ws + scratch_bytes(c.node, c.max_tokens()), tiles);
        cuda::experts_cutlass_grouped(lane(c), bf16_in(c, 0), c.in<int32_t>(1), op.experts(), c.tokens * op.top_k(),
                                      hidden_of(c), op.intermediate(), bf16_in(c, 2), bf16_in(c, 3), h, act,
                                      bf16_out(c, 0), ws + scratch_bytes(c.node, c.max_tokens()), tiles,
                                      static_cast<const uint16_t*>(c.packed));
      },
      [scratch_bytes](const Graph&, const Node& n, int64_t tokens) {
        return scratch_bytes(n, tokens) +
               static_cast<int64_t>(cuda::cutlass_grouped_workspace_bytes(static_cast<const ExpertsOp&>(*n.op).experts()));
      }}));
  e.priority_on = [range, priority](const Graph& g, const Node& n) {
    const double mean = rows_per_expert(n, g.max_tokens_of(n));
    if (!range.preferred_on_huge && huge_experts(g, n)) return range.elsewhere;
    return mean >= range.preferred_from && mean < range.preferred_to ? priority : range.elsewhere;
  };
  if (swiglu_epilogue) e.packed_weight = packed_expert_weights(2, weight_tiles, std::move(swiglu_twin));
  e.holds_every_sm = true;  // CUTLASS's persistent tile scheduler (KernelEntry::holds_every_sm)
  return e;
}

// Below this many rows per expert the 64x256 tiles read the weights packed tile by tile (register_experts).
constexpr double kTilesBelowRows = 56;
// From 96 rows per expert the gathering kernel reads the packed tiles only up to this H (K of GEMM 1):
// measured ahead on qwen's 2048, and the packed tiles re-read their operands on deepseek-v3's 7168.
constexpr int kTilesMostHiddenFrom96 = 4096;

constexpr const char* kNarrowText = "64x256 tiles, ping-pong (an expert's rows padded to 64)";
constexpr const char* kWideSingleText = "128x256 tiles, no cluster (an expert's rows padded to 128)";
constexpr const char* kNarrowPairText =
    "64x256 tiles, ping-pong, in 2x1 clusters (each weight tile multicast to two row tiles; rows padded to 128)";

void register_experts(KernelRegistry& r) {
  // Our own decode kernel: for few rows per expert it streams each touched expert's weights once,
  // which is what bounds decode; a GEMM library pays tile padding and extra launches there.
  // Sized for the maximum rows, it writes zeros past offsets[E], so it serves a live T as it is.
  // Measured on the H100: ahead of every cuBLAS strategy up to one row per expert on average. At
  // two, a GEMM's reuse of each weight wins on small experts (qwen3 T=32), so the kernel is planned
  // there only on huge ones: mixtral-8x7b T=8 (16 rows on 8 experts of 336 MiB) 922-927 µs = 1.09x
  // the floor eager and in a CUDA graph, against the padded GEMM (the capturable alternative, which
  // reads every expert) 1022-1033 µs and cuBLAS's grouped GEMM with its host sync 910 µs (2026-11-23,
  // bench/NOTES.md "Our decode kernel"): 1.7% behind that one, without stalling the host. Where the
  // chain may be fused, above one row per expert, the gathering fused node runs it instead
  // (register_fused_experts: 843 µs there).
  KernelEntry decode = reading_live_tokens(launching(2, {"experts", Backend::cuda, "cuda.decode_gemv", 7,
         [](const Graph& g, const Node& n) {
           Support s = cuda_supports_bf16(g, n, "");
           if (!s.ok) return s;
           const auto& op = static_cast<const ExpertsOp&>(*n.op);
           const int64_t H = g.value(n.inputs[0]).shape()[1].fixed;
           if (!cuda::decode_experts_supported(static_cast<int>(H), op.intermediate()))
             return Support::no("H = " + std::to_string(H) + ", I = " + std::to_string(op.intermediate()) +
                                ": the decode kernel's 16-byte loads need multiples of 8");
           const int64_t rows = g.max_tokens_of(n) * op.top_k();
           const std::string streams = ": our decode kernel streams each touched expert's w13 and w2 once per " +
                                       std::to_string(cuda::kDecodeRowsPerPass) +
                                       " rows, SwiGLU in registers, offsets on the device (no host sync, capturable)";
           if (rows <= op.experts()) return Support::yes("T*k = " + std::to_string(rows) + " <= E" + streams);
           if (rows > 2 * op.experts())
             return Support::no("T*k = " + std::to_string(rows) + " > 2E = " + std::to_string(2 * op.experts()) +
                                ": more than two rows per expert on average, where a GEMM reuses each weight better");
           return Support::yes("T*k = " + std::to_string(rows) + " <= 2E" + streams +
                               (huge_experts(H, op.intermediate())
                                    ? "; on " + expert_mib(H, op.intermediate()) + " the weights read are all that counts"
                                    : std::string("; behind a GEMM's reuse of each weight here, so planned only where forced")));
         },
         [](const KernelCall& c) {
           const auto& op = static_cast<const ExpertsOp&>(*c.node.op);
           uint16_t *h, *act;
           experts_scratch(c, static_cast<std::byte*>(c.workspace), h, act);
           cuda::experts_decode(lane(c), bf16_in(c, 0), c.in<int32_t>(1), op.experts(), c.tokens * op.top_k(),
                                hidden_of(c), op.intermediate(), bf16_in(c, 2), bf16_in(c, 3), act, bf16_out(c, 0));
         },
         [](const Graph&, const Node& n, int64_t tokens) { return experts_scratch_bytes(n, tokens); }}));
  decode.priority_on = [](const Graph& g, const Node& n) {
    const auto& op = static_cast<const ExpertsOp&>(*n.op);
    return g.max_tokens_of(n) * op.top_k() <= op.experts() || huge_experts(g, n) ? 7 : 0;
  };
  r.add(std::move(decode));
  // CUTLASS's Hopper grouped GEMM with its problem sizes written on the device: no host sync, so
  // capturable, and no padding; ahead of every cuBLAS strategy wherever it can run. Which tiles, by
  // the mean rows per expert at the maximum T (H100, experts path in a CUDA graph, every
  // configuration forced in one call, 2026-11-23; bench/NOTES.md "CUTLASS grouped GEMM"): an
  // expert's rows round up to the tile's rows (a cluster's, where there is one), so experts of a few
  // hundred rows ± a few dozen pay a whole extra row tile about half the time.
  //  - 64x256 from 96 to 192 rows: qwen3 / qwen1.5 T=2048 (128 / 137 rows) 648 / 545 µs against
  //    665 / 568 with 128x256 tiles, and 1-6% ahead of the 128x128 tiles from T=8 to 128;
  //  - below 96 rows the same tiles in 2x1 clusters (a weight tile multicast to two 64-row tiles; an
  //    expert's rows padded to 128). Fused, µs, pairs / alone (2026-11-23, seventh session,
  //    bench/NOTES.md "The 64-row tiles in pairs"): qwen1.5 T=1024 (68 rows) 455 / 501-508, deepseek-v3
  //    T=2048 (64) 8396 / 8723, T=512 (16) 7853 / 8049, T=128 (4) 7501 / 7662; qwen3 T=32..1024
  //    0.5-2.5% ahead; but at 128 rows, where the rows past 128 cost a second pair, behind: qwen3 /
  //    qwen1.5 T=2048 625 / 543 against 604 / 503, and further at 256 (T=4096);
  //  - 128x256 without a cluster from 192: deepseek-v3 T=8192 (256 rows) 12.6 ms against 13.6 (64-row
  //    tiles) and 14.1 (2x1 clusters), qwen1.5 T=4096 761 against 823 / 874 µs, and 4-8% ahead of the
  //    2x1 clusters up to 2048 rows (mixtral T=8192 8892 against 9235-9291 µs);
  //  - the 128x256 tiles in 2x1 clusters and the 128x128 tiles are never preferred now, and every
  //    configuration still runs where forced (--kernel), except the 128x256 clusters below 128 rows.
  //  - GEMM 1 with SwiGLU in its epilogue (w13 packed once at bind time) ahead of the same tiles
  //    without it, in the same ranges (registered first: ties go to it). Same call, CUDA graph
  //    (bench/NOTES.md "SwiGLU in GEMM 1's epilogue"): 64x256 qwen3 / qwen1.5 T=2048 616-621 / 514-519
  //    against 651 / 547 µs, T=512 527 / 454 against 536 / 463; deepseek-v3 T=2048 8763 against
  //    8925; 128x256 at T=8192: qwen3 1447-1460 against 1474, deepseek-v3 12834 against 12987,
  //    qwen1.5 even (1244-1271 against 1270). The 64x256 ones on huge experts too: mixtral-8x7b
  //    T=512 / 640 / 736 (128-184 rows) 1124 / 1147 / 1267 against 1163-1165 / 1170-1180 /
  //    1308-1310 µs (2026-11-23, seventh session, same call, CUDA graph). The 128x256 ones on huge
  //    experts since their epilogue's stores wait for the next tile's MMAs (twenty-second session;
  //    before, mixtral-8x7b T=8192 9421-9638 against 9274 µs kept the unfused tiles there): mixtral-8x7b
  //    T = 1024 / 2048 / 4096 / 8192 1465-1474 / 2340-2363 / 4513-4552 / 8735-8821 against the unfused
  //    tiles' 1513-1516 / 2448-2544 / 4868-4875 / 9109-9235 µs (h100_mixtral_fused_wide_2026-11-25.txt).
  //  - Ahead of all of them below 56 rows per expert: the 64x256 tiles reading w13 and w2 packed tile
  //    by tile (each weight tile a k-block loads one contiguous 32 KB), where the GEMMs stream the
  //    weights. Same call, CUDA graph, 20 runs x 2 passes (2026-11-23, eighth session, bench/NOTES.md
  //    "Weights packed tile by tile"), µs, packed 64x256 / as planned before: qwen3 T=32 / 128 / 512
  //    (2 / 8 / 32 rows) 402 / 464 / 496 against 446 / 477 / 510; qwen1.5 T=128 / 512 397 / 417
  //    against 412 / 431; deepseek-v3 T=128 / 512 / 1024 / 1536 (4 / 16 / 32 / 48 rows) 7260 / 7655 /
  //    7920 / 8139 against 7511 / 7852 / 8032 / 8211. Not from 64 rows: deepseek-v3 T=2048 (64) 8516
  //    against 8404 and T=4096 (128) 13380 against 9460 (GEMM 1 then reads 27 GB from DRAM against 16
  //    in Nsight Compute: A's rows or the weight tiles miss L2 where they did not); qwen at 96-137
  //    rows 0.5-2.4% ahead. Not on huge experts (mixtral-8x7b T=512: 1229 against 1118). The packed tiles in 2x1
  //    clusters and the 128x256 ones run where forced (or tuned) only.
  r.add(cutlass_grouped("cuda.cutlass_tiles_narrow", 6, cuda::CutlassTiles::narrow,
                        {.huge_min_rows = 128, .preferred_to = kTilesBelowRows, .elsewhere = 1, .preferred_on_huge = false},
                        kNarrowText, "cuda.cutlass_grouped_narrow", true));
  r.add(cutlass_grouped("cuda.cutlass_tiles_narrow_pair", 1, cuda::CutlassTiles::narrow_pair,
                        {.huge_min_rows = 128, .elsewhere = 1}, kNarrowPairText, "cuda.cutlass_grouped_narrow_pair", true));
  r.add(cutlass_grouped("cuda.cutlass_tiles_wide_single", 1, cuda::CutlassTiles::wide_single,
                        {.huge_min_rows = 128, .elsewhere = 1}, kWideSingleText,
                        "cuda.cutlass_grouped_wide_single", true));
  r.add(cutlass_grouped("cuda.cutlass_swiglu_narrow_pair", 6, cuda::CutlassTiles::narrow_pair,
                        {.huge_min_rows = 128, .preferred_to = 96, .elsewhere = 2},
                        kNarrowPairText, "cuda.cutlass_grouped_narrow_pair"));
  r.add(cutlass_grouped("cuda.cutlass_swiglu_narrow", 6, cuda::CutlassTiles::narrow,
                        {.huge_min_rows = 128, .preferred_from = 96, .preferred_to = 192, .elsewhere = 4},
                        kNarrowText, "cuda.cutlass_grouped_narrow"));
  r.add(cutlass_grouped("cuda.cutlass_swiglu_wide_single", 6, cuda::CutlassTiles::wide_single,
                        {.huge_min_rows = 128, .preferred_from = 192, .elsewhere = 3},
                        kWideSingleText, "cuda.cutlass_grouped_wide_single"));
  r.add(cutlass_grouped("cuda.cutlass_grouped_narrow_pair", 6, cuda::CutlassTiles::narrow_pair,
                        {.huge_min_rows = 128, .preferred_to = 96, .elsewhere = 2}, kNarrowPairText));
  r.add(cutlass_grouped("cuda.cutlass_grouped_narrow", 6, cuda::CutlassTiles::narrow,
                        {.huge_min_rows = 128, .preferred_from = 96, .preferred_to = 192, .elsewhere = 4},
                        kNarrowText));
  r.add(cutlass_grouped("cuda.cutlass_grouped_wide_single", 6, cuda::CutlassTiles::wide_single,
                        {.huge_min_rows = 128, .preferred_from = 192, .elsewhere = 3},
                        kWideSingleText));
  r.add(cutlass_grouped("cuda.cutlass_grouped", 5, cuda::CutlassTiles::general, {.huge_min_rows = 128, .elsewhere = 5},
                        "128x128 tiles"));
  r.add(cutlass_grouped("cuda.cutlass_grouped_wide", 4, cuda::CutlassTiles::wide,
                        {.min_rows = 128, .preferred_to = 0, .elsewhere = 4},
                        "128x256 tiles in 2x1 clusters (each weight tile multicast to two row tiles; rows padded to 256)"));
  r.add(launching(4, {"experts", Backend::cuda, "cuda.cublas_rows_batched", 3,
         [](const Graph& g, const Node& n) {
           Support s = cuda_supports_bf16(g, n, "");
           if (!s.ok) return s;
           const auto& op = static_cast<const ExpertsOp&>(*n.op);
           const int64_t rows = g.max_tokens_of(n) * op.top_k();
           if (rows > 2 * op.experts())
             return Support::no("T*k = " + std::to_string(rows) + " > 2E = " + std::to_string(2 * op.experts()) +
                                ": rows share experts, and each row would read its expert's weights again");
           const int64_t H = g.value(n.inputs[0]).shape()[1].fixed;
           if (rows > op.experts() && huge_experts(H, op.intermediate()))
             return Support::no("T*k = " + std::to_string(rows) + " > E on " + expert_mib(H, op.intermediate()) +
                                ": re-reading such an expert per row costs more than a GEMM over its rows");
           return Support::yes("T*k = " + std::to_string(rows) + " <= 2E: one batched 1-row GEMM per layer, pointers "
                               "built on the device (no host sync, capturable)");
         },
         [](const KernelCall& c) {
           const auto& op = static_cast<const ExpertsOp&>(*c.node.op);
           uint16_t *h, *act;
           experts_scratch(c, static_cast<std::byte*>(c.workspace), h, act);
           void* ptrs = static_cast<std::byte*>(c.workspace) + experts_scratch_bytes(c.node, c.max_tokens());
           cuda::experts_rows_batched(lane(c), bf16_in(c, 0), c.in<int32_t>(1), op.experts(), c.tokens * op.top_k(),
                                      hidden_of(c), op.intermediate(), bf16_in(c, 2), bf16_in(c, 3), h, act,
                                      bf16_out(c, 0), ptrs);
         },
         [](const Graph&, const Node& n, int64_t tokens) {
           const auto& op = static_cast<const ExpertsOp&>(*n.op);
           return experts_scratch_bytes(n, tokens) +
                  align256(static_cast<int64_t>(cuda::rows_batched_pointer_bytes(tokens * op.top_k())));
         }}));
  r.add(launching(4, {"experts", Backend::cuda, "cuda.cublas_grouped_batched", 2,
         [](const Graph& g, const Node& n) {
           Support s = cuda_supports_bf16(g, n, "");
           if (!s.ok) return s;
           return Support::yes(fmt(rows_per_expert(n, g.max_tokens_of(n))) +
                               " rows/expert at max T -> grouped_batched: one cuBLAS call per GEMM layer (host sync)");
         },
         [](const KernelCall& c) { run_grouped(c, static_cast<std::byte*>(c.workspace)); },
         [](const Graph&, const Node& n, int64_t tokens) { return grouped_workspace_bytes(n, tokens); }, {1},
         grouped_host_bytes}));
  // Large batches: the host already waits for the counts, so size one uniform strided-batched GEMM
  // to this run's largest expert (about 1.1-1.3x the mean once experts get hundreds of rows)
  // instead of cuBLAS's grouped GEMM over ragged groups. Scratch is planned for 1.5x the mean at
  // the maximum T; a run whose routing is more skewed than that takes the grouped path instead.
  auto planned_capacity = [](const Graph& g, const Node& n) {
    const auto& op = static_cast<const ExpertsOp&>(*n.op);
    const int64_t mean = (g.max_tokens_of(n) * op.top_k() + op.experts() - 1) / op.experts();
    return std::min<int64_t>(g.max_tokens_of(n), mean + mean / 2 + 64);
  };
  auto padded_part = [planned_capacity](const Graph& g, const Node& n) {
    const auto& op = static_cast<const ExpertsOp&>(*n.op);
    return align256(static_cast<int64_t>(cuda::padded_scratch_bytes(
        op.experts(), planned_capacity(g, n), static_cast<int>(g.value(n.inputs[0]).shape()[1].fixed), op.intermediate())));
  };
  KernelEntry padded = launching(6, {"experts", Backend::cuda, "cuda.cublas_padded_to_max", 4,
         [planned_capacity, padded_part](const Graph& g, const Node& n) {
           Support s = cuda_supports_bf16(g, n, "");
           if (!s.ok) return s;
           const double mean = rows_per_expert(n, g.max_tokens_of(n));
           if (mean < 128)
             return Support::no(fmt(mean) + " rows/expert at max T: padding to the largest expert wastes too much");
           if (padded_part(g, n) > (int64_t{16} << 30)) return Support::no("padded scratch above 16 GiB");
           const auto& op = static_cast<const ExpertsOp&>(*n.op);
           const int64_t H = g.value(n.inputs[0]).shape()[1].fixed;
           return Support::yes(fmt(mean) + " rows/expert at max T -> one strided-batched GEMM per layer padded to the "
                               "largest expert of the run (host sync); grouped when routing is more skewed than " +
                               std::to_string(planned_capacity(g, n)) + " rows" +
                               (huge_experts(H, op.intermediate())
                                    ? "; ahead of CUTLASS on " + expert_mib(H, op.intermediate()) + " (cuBLAS's tiles run "
                                      "so few, so large experts faster)"
                                    : std::string()));
         },
         [planned_capacity, padded_part](const KernelCall& c) {
           const auto& op = static_cast<const ExpertsOp&>(*c.node.op);
           const int32_t* host_offsets = c.in<int32_t>(1);
           int64_t largest = 0;
           for (int e = 0; e < op.experts(); ++e) largest = std::max<int64_t>(largest, host_offsets[e + 1] - host_offsets[e]);
           auto* ws = static_cast<std::byte*>(c.workspace);
           const int64_t padded_bytes = padded_part(c.graph, c.node);
           if (largest <= planned_capacity(c.graph, c.node)) {
             auto* device_offsets = reinterpret_cast<int32_t*>(ws + padded_bytes);
             MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(device_offsets, host_offsets, sizeof(int32_t) * (op.experts() + 1),
                                                cudaMemcpyHostToDevice, lane(c).stream));
             cuda::experts_padded_strided_batched(lane(c), bf16_in(c, 0), device_offsets, op.experts(), largest,
                                                  hidden_of(c), op.intermediate(), bf16_in(c, 2), bf16_in(c, 3), ws,
                                                  bf16_out(c, 0));
             return;
           }
           // Skewed routing: the grouped path, in the workspace that follows the padded region.
           run_grouped(c, ws + padded_bytes + align256(4 * (op.experts() + 1)));
         },
         [padded_part](const Graph& g, const Node& n, int64_t tokens) {
           const auto& op = static_cast<const ExpertsOp&>(*n.op);
           return padded_part(g, n) + align256(4 * (op.experts() + 1)) + grouped_workspace_bytes(n, tokens);
         },
         {1}, grouped_host_bytes});
  // Huge experts (mixtral-8x7b's 336 MiB) with hundreds of rows each: cuBLAS's padded GEMM ahead of
  // CUTLASS's grouped GEMMs wherever a host sync is allowed (a CUDA graph still gets CUTLASS). Measured
  // on the H100: mixtral-8x7b experts path T=2048 2334 against 2616 µs (wide CUTLASS), layer T=8192
  // 9040 against 9256 µs, and in 4 chunks of 2048 tokens 10200 against 11639 µs
  // (h100_mixtral_chunks_padded_vs_wide_2026-11-22.jsonl, h100_tune_2026-11-22.txt).
  padded.priority_on = [](const Graph& g, const Node& n) { return huge_experts(g, n) ? 8 : 4; };
  r.add(std::move(padded));
  // Three launches per touched expert; the planner counts one expert's worth.
  KernelEntry loop = launching(3, {"experts", Backend::cuda, "cuda.cublas_per_expert_loop", 1,
         [](const Graph& g, const Node& n) {
           Support s = cuda_supports_bf16(g, n, "");
           if (!s.ok) return s;
           const auto& op = static_cast<const ExpertsOp&>(*n.op);
           const int64_t H = g.value(n.inputs[0]).shape()[1].fixed;
           return Support::yes("one cuBLAS GEMM per touched expert and layer (host sync)" +
                               (exact_sizes_pay(g, n) ? "; " + fmt(rows_per_expert(n, g.max_tokens_of(n))) +
                                                            " rows/expert at max T on " + expert_mib(H, op.intermediate()) +
                                                            ": each GEMM sized to its expert's rows, ahead of padding"
                                                      : std::string()));
         },
         [](const KernelCall& c) {
           const auto& op = static_cast<const ExpertsOp&>(*c.node.op);
           uint16_t *h, *act;
           experts_scratch(c, static_cast<std::byte*>(c.workspace), h, act);
           cuda::experts_per_expert_loop(lane(c), bf16_in(c, 0), c.in<int32_t>(1), op.experts(), hidden_of(c),
                                         op.intermediate(), bf16_in(c, 2), bf16_in(c, 3), h, act, bf16_out(c, 0));
         },
         [](const Graph&, const Node& n, int64_t tokens) { return experts_scratch_bytes(n, tokens); },
         {1}});
  // Huge experts with a thousand rows each or more: exact sizes beat padding to the largest expert
  // (mixtral-8x7b layer on the H100, medians over passes: T=8192 unchunked 9124-9216 against
  // 9424-9682 µs padded, three calls; 2 chunks of 4096 tokens 9626-9643 against 9888-10050; at 4
  // chunks (512 rows) padding wins, 10277 against 11026; `h100_mixtral_chunks_views*_2026-11-23.jsonl`).
  loop.priority_on = [](const Graph& g, const Node& n) { return exact_sizes_pay(g, n) ? 9 : 1; };
  r.add(std::move(loop));
  r.add(launching(5, {"experts", Backend::cuda, "cuda.cublas_padded_strided", 0,
         [](const Graph& g, const Node& n) {
           Support s = cuda_supports_bf16(g, n, "");
           if (!s.ok) return s;
           const auto& op = static_cast<const ExpertsOp&>(*n.op);
           const int64_t H = g.value(n.inputs[0]).shape()[1].fixed;
           const int64_t capacity = g.max_tokens_of(n);  // distinct ids per token: no expert gets more rows than T
           const std::size_t bytes = cuda::padded_scratch_bytes(op.experts(), capacity, static_cast<int>(H), op.intermediate());
           if (bytes > (std::size_t{16} << 30))
             return Support::no("padding every expert to " + std::to_string(capacity) + " rows needs " +
                                fmt(static_cast<double>(bytes) / (1 << 30)) + " GiB of scratch");
           return Support::yes("every expert padded to " + std::to_string(capacity) + " rows (" +
                               fmt(static_cast<double>(op.experts()) * capacity / (capacity * op.top_k())) +
                               "x the routed rows): no host sync, capturable");
         },
         [](const KernelCall& c) {
           const auto& op = static_cast<const ExpertsOp&>(*c.node.op);
           // Distinct ids per token: no expert gets more rows than this run's T.
           cuda::experts_padded_strided_batched(lane(c), bf16_in(c, 0), c.in<int32_t>(1), op.experts(),
                                                c.tokens, hidden_of(c), op.intermediate(), bf16_in(c, 2),
                                                bf16_in(c, 3), c.workspace, bf16_out(c, 0));
         },
         [](const Graph& g, const Node& n, int64_t tokens) {
           const auto& op = static_cast<const ExpertsOp&>(*n.op);
           return static_cast<int64_t>(cuda::padded_scratch_bytes(
               op.experts(), tokens, static_cast<int>(g.value(n.inputs[0]).shape()[1].fixed), op.intermediate()));
         }}));
}

cuda::FusedDecodeShape fused_shape(const Graph& g, const Node& n) {
  const auto& op = static_cast<const FusedExpertsOp&>(*n.op);
  cuda::FusedDecodeShape s{op.experts(), op.top_k(), static_cast<int>(g.value(n.inputs[0]).shape()[1].fixed),
                           op.intermediate(), g.max_tokens_of(n)};
  if (const auto& shared = op.shared()) {
    s.shared_intermediate = shared->intermediate;
    s.shared_gated = shared->gated;
  }
  return s;
}

// The fused kernels other than the gathering ones end in their own sum: the shared add stays a reduce.
Support refuses_addends(const Node& n) {
  const int addends = static_cast<const FusedExpertsOp&>(*n.op).addends();
  if (addends > 0) return Support::no(std::to_string(addends) + " addend(s) folded in: it sums the routed choices only");
  return Support::yes("");
}

// Why folding the node's shared expert into one fused kernel would not pay, or empty: where its
// weights are a small part of the bytes it hides beside the routed branch as well (kFoldSharedBytes).
std::string fold_share_declined(const cuda::FusedDecodeShape& shape) {
  const double touched = expected_touched_experts(shape.experts, shape.top_k, static_cast<double>(shape.max_tokens));
  const double share = static_cast<double>(expert_bytes(shape.hidden, shape.shared_intermediate)) /
                       (touched * static_cast<double>(expert_bytes(shape.hidden, shape.intermediate)));
  if (share >= kFoldSharedBytes) return {};
  std::ostringstream why;
  why << std::fixed << std::setprecision(2) << "shared expert folded in: its weights are " << share
      << " of the routed experts' expected at T=" << shape.max_tokens << " (folded from " << kFoldSharedBytes
      << "): beside the routed branch it costs as little";
  return why.str();
}

// The folded shared expert's weights (inputs 5, 6 and the gate's 7), where the node has one.
cuda::FusedSharedWeights fused_shared_weights(const KernelCall& c) {
  const auto& shared = static_cast<const FusedExpertsOp&>(*c.node.op).shared();
  if (!shared) return {};
  return {bf16_in(c, 5), bf16_in(c, 6), shared->gated ? bf16_in(c, 7) : nullptr};
}

// The fused node (dispatch -> experts -> combine) on the 64x256 tiles with SwiGLU in GEMM 1's
// epilogue, GEMM 1 gathering its rows from x in its loads (cuda::experts_cutlass_gathered): the
// chain's work less the dispatch's scatter, which writes T*k rows of H that GEMM 1 reads back. Steps:
// the permutation on the device (offsets, slot_of, row_source: no row copied), GEMM 1 from x into act,
// GEMM 2 into y [T*k, H], the chain's combine (fixed order, no atomics). Bit for bit the chain on the
// same tiles (cuda.cutlass_tiles_narrow with `weight_tiles`, else cuda.cutlass_swiglu_narrow).
// It runs only where `preferred` says (register_fused_experts has the measurements): elsewhere the
// fuse pass keeps the chain, since a fused kernel that runs a node takes it.
struct GatheredScratch {
  int32_t *offsets, *slot_of, *row_source;
  void* sort;
  std::size_t sort_bytes;
  uint16_t *act, *y;
  void* cutlass;
  int64_t bytes;
};
GatheredScratch gathered_scratch(const cuda::FusedDecodeShape& s, int64_t tokens, void* workspace) {
  auto* base = static_cast<std::byte*>(workspace);
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    std::byte* p = base ? base + at : nullptr;
    at += align256(bytes);
    return p;
  };
  const int64_t rows = tokens * s.top_k;
  GatheredScratch w{};
  w.offsets = reinterpret_cast<int32_t*>(take((s.experts + 1) * 4));
  w.slot_of = reinterpret_cast<int32_t*>(take(rows * 4));
  w.row_source = reinterpret_cast<int32_t*>(take(rows * 4));
  w.sort_bytes = cuda::permutation_workspace_bytes(tokens, s.top_k, s.experts);
  w.sort = take(static_cast<int64_t>(w.sort_bytes));
  w.act = reinterpret_cast<uint16_t*>(take(rows * s.intermediate * 2));
  w.y = reinterpret_cast<uint16_t*>(take(rows * s.hidden * 2));
  w.cutlass = take(static_cast<int64_t>(cuda::cutlass_grouped_workspace_bytes(s.experts)));
  w.bytes = at;
  return w;
}

int op_addends(const Node& n) { return static_cast<const FusedExpertsOp&>(*n.op).addends(); }

// Why a gathering kernel is not the planner's choice for `shape` at `mean` rows per expert (at the
// maximum T), or empty where it is.
using GatherPreferred = std::string (*)(const cuda::FusedDecodeShape& shape, double mean);

// Rows per expert the node gets at its maximum T, on average.
double mean_rows_per_expert(const cuda::FusedDecodeShape& shape) {
  return static_cast<double>(shape.max_tokens * shape.top_k) / shape.experts;
}

// It runs any routed-experts node CUTLASS's tiles can build; the planner takes it on its own only
// where `preferred` says (the measurements are at register_fused_experts), so elsewhere the fuse
// pass keeps the chain, while --kernel or `moeflow tune` may still run it there.
KernelEntry cutlass_gathered(std::string name, bool weight_tiles, cuda::CutlassTiles tiles, GatherPreferred preferred) {
  const bool wide = tiles == cuda::CutlassTiles::wide_single;
  KernelEntry e = reading_live_tokens(launching(7, {"fused_experts", Backend::cuda, std::move(name), 3,
      [weight_tiles, wide](const Graph& g, const Node& n) {
        Support s = cuda_supports_bf16(g, n, "");
        if (!s.ok) return s;
        const cuda::FusedDecodeShape shape = fused_shape(g, n);
        if (shape.shared_intermediate > 0) return Support::no("a shared expert folded in: it runs the routed experts only");
        if (const std::string why = cuda::cutlass_grouped_unbuildable(shape.hidden, shape.intermediate); !why.empty())
          return Support::no(why);
        for (int input : weight_tiles ? std::vector<int>{3, 4} : std::vector<int>{3})
          if (g.value(n.inputs[input]).role != ValueRole::weight)
            return Support::no("'" + g.value(n.inputs[input]).name + "' is not a weight bound once, so it cannot be packed once");
        const double mean = mean_rows_per_expert(shape);
        return Support::yes(fmt(mean) + " rows/expert at max T -> the chain on CUTLASS's " +
                            std::string(wide ? kWideSingleText : kNarrowText) + " with SwiGLU in GEMM 1's epilogue" +
                            (weight_tiles ? ", w13 and w2 packed tile by tile" : ", w13 packed once") +
                            ", GEMM 1 gathering its rows from x (" + (wide ? "three" : "two") +
                            " producer warps, cp.async): no permuted copy of x" +
                            (op_addends(n) > 0 ? "; the shared add in its combine" : ""));
      },
      [weight_tiles, tiles](const KernelCall& c) {
        const cuda::FusedDecodeShape shape = fused_shape(c.graph, c.node);
        const GatheredScratch w = gathered_scratch(shape, c.max_tokens(), c.workspace);
        if (c.packed == nullptr) fail_input("node '" + c.node.name + "': w13 was not packed");
        const int k = shape.top_k;
        cuda::build_permutation(c.in<int32_t>(1), c.tokens, k, shape.experts, w.offsets, w.slot_of, w.row_source, w.sort,
                                w.sort_bytes, lane(c).stream, cuda::LiveRows{c.live_tokens, k});
        cuda::experts_cutlass_gathered(lane(c), {bf16_in(c, 0), w.row_source, k}, w.offsets, shape.experts, shape.hidden,
                                       shape.intermediate, static_cast<const uint16_t*>(c.packed), weight_tiles,
                                       bf16_in(c, 4), w.act, w.y, w.cutlass, tiles);
        static_assert(FusedExpertsOp::kMaxAddends <= cuda::RowAddends::kMax);
        cuda::RowAddends addends;  // the shared experts' outputs, where their add was folded in
        addends.count = op_addends(c.node);
        for (int a = 0; a < addends.count; ++a) addends.rows[a] = bf16_in(c, 5 + static_cast<std::size_t>(a));
        cuda::combine_rows(w.y, w.slot_of, c.in<float>(2), c.tokens, k, shape.hidden, bf16_out(c, 0), lane(c).stream, {},
                           cuda::LiveRows{c.live_tokens, 1}, addends);
      },
      [](const Graph& g, const Node& n, int64_t tokens) { return gathered_scratch(fused_shape(g, n), tokens, nullptr).bytes; }}));
  e.packed_weight = packed_expert_weights(3, weight_tiles, {});
  e.in_place = {{0, 5}};  // over the first addend, where there is one (combine_rows reads it first)
  e.passed_over_on = [preferred](const Graph& g, const Node& n) {
    const cuda::FusedDecodeShape shape = fused_shape(g, n);
    const int64_t rows = shape.max_tokens * shape.top_k;
    if (rows <= shape.experts)
      return "T*k = " + std::to_string(rows) + " <= E: at most one row per expert, the decode kernels'";
    return preferred(shape, mean_rows_per_expert(shape));
  };
  e.holds_every_sm = true;  // CUTLASS's persistent tile scheduler (KernelEntry::holds_every_sm)
  return e;
}

// The fuse pass (ops/fuse_experts.hpp) makes a fused_experts node wherever this kernel supports it.
void register_fused_experts(KernelRegistry& r) {
  r.add(starting_early(reading_live_tokens(launching(1, {"fused_experts", Backend::cuda, "cuda.fused_decode", 0,
         [](const Graph& g, const Node& n) {
           Support s = cuda_supports_bf16(g, n, "");
           if (!s.ok) return s;
           if (Support a = refuses_addends(n); !a.ok) return a;
           const cuda::FusedDecodeShape shape = fused_shape(g, n);
           if (const std::string why = cuda::fused_decode_unsupported(shape); !why.empty()) return Support::no(why);
           // Where experts get more than one row on average a GEMM reuses each weight better (the
           // unfused chain's decode kernel stops at the same point).
           const int64_t rows = shape.max_tokens * shape.top_k;
           if (rows > shape.experts)
             return Support::no("T*k = " + std::to_string(rows) + " > E = " + std::to_string(shape.experts) +
                                ": more than one row per expert on average");
           // Measured on the H100 (fused_decode.hpp): faster than the chain except on huge experts.
           if (huge_experts(shape.hidden, shape.intermediate))
             return Support::no(expert_mib(shape.hidden, shape.intermediate) + ": its second phase would have too few "
                                "items to fill the GPU; the chain's decode kernels stream faster");
           std::string shared;
           if (shape.shared_intermediate > 0) {
             // Every token uses the shared expert: its weights stream once per group of rows, so
             // only where all tokens fit one group.
             if (shape.max_tokens > cuda::kFusedRowsPerGroup)
               return Support::no("shared expert folded in: " + std::to_string(shape.max_tokens) + " tokens would stream its "
                                  "weights once per " + std::to_string(cuda::kFusedRowsPerGroup) + " of them");
             if (const std::string why = fold_share_declined(shape); !why.empty()) return Support::no(why);
             shared = "; the shared expert (S = " + std::to_string(shape.shared_intermediate) + ") folded in as " +
                      std::to_string(shape.shared_intermediate / shape.intermediate) +
                      " more experts of I every token uses, its weights in the same stream, its add in the combine";
           }
           return Support::yes("T*k = " + std::to_string(rows) + " <= E: dispatch, SwiGLU MLP and combine in one launch "
                               "(saves four); each touched expert's weights streamed once per " +
                               std::to_string(cuda::kFusedRowsPerGroup) + " rows, x read in place" + shared);
         },
         [](const KernelCall& c) {
           cuda::experts_fused_decode(lane(c), fused_shape(c.graph, c.node), c.tokens, c.live_tokens, bf16_in(c, 0),
                                      c.in<int32_t>(1), c.in<float>(2), bf16_in(c, 3), bf16_in(c, 4), bf16_out(c, 0),
                                      c.workspace, fused_shared_weights(c), c.starts_early);
         },
         [](const Graph& g, const Node& n, int64_t tokens) {
           cuda::FusedDecodeShape shape = fused_shape(g, n);
           shape.max_tokens = tokens;
           return cuda::fused_decode_workspace_bytes(shape);
         }})),
         // Where it has work that needs no routing: the folded shared expert's gate/up rows. Without it
         // the early blocks only wait; measured on the H100 (whole layers, CUDA-graph replays, early
         // against --no-early-start): qwen1.5 folded T = 1 / 2 / 4 80.9 / 105.5 / 163.3 against 92.5 /
         // 117.3 / 175.4 µs; unfolded, qwen3 51.2 / 91.7 / 137.4 against 51.4 / 93.0 / 140.5 but
         // deepseek-v3 330.9 / 576.5 / 1006.6 against 322.3 / 562.1 / 1002.6.
         [](const Graph&, const Node& n) { return static_cast<const FusedExpertsOp&>(*n.op).shared().has_value(); }));
  // One token (decode of one sequence): every block one equal slice of the k experts' weight
  // streams, instead of a down projection that waits for each expert's whole gate/up phase. Two
  // kernels, by how they read w2: in place, in quads of 64 features (cuda.fused_single_token), or
  // transposed from a copy packed once at bind time (cuda.fused_single_token_w2t, below). Ahead of the
  // two-phase kernel where the graph's maximum T is 1 and its items fit about one round of resident
  // blocks; behind it elsewhere (priority_on). Measured on the H100 (experts path, CUDA graph, T=1;
  // bench/results/h100_fused_single_token_2026-11-23.jsonl), the quads: qwen1.5 / qwen3 (352 / 384
  // items) 37.4 / 39.2 µs against 39.8 / 41.6; deepseek-v3 (1024 items, three rounds) 271.6 against
  // 242.6.
  constexpr int kSingleTokenMostItems = 512;
  auto single_token_shape = [](const Graph& g, const Node& n) {
    const cuda::FusedDecodeShape f = fused_shape(g, n);
    return cuda::FusedSingleTokenShape{f.experts, f.top_k, f.hidden, f.intermediate, f.shared_intermediate, f.shared_gated};
  };
  // The routed choices' items (a folded shared expert's come on top).
  auto single_token_items = [single_token_shape](const Graph& g, const Node& n) {
    const cuda::FusedSingleTokenShape shape = single_token_shape(g, n);
    return shape.top_k * shape.intermediate / 16;
  };
  // supports() of either kernel: `unsupported` says which shapes it runs, `how_w2` how it reads w2;
  // with `w2_packed` it reads a copy of w2, which must then be a weight (bound once, packed once);
  // with `runs_shared` it runs a folded shared expert too.
  auto single_token_supports = [single_token_shape, single_token_items](
                                   std::string (*unsupported)(const cuda::FusedSingleTokenShape&), std::string how_w2,
                                   bool w2_packed, bool runs_shared) {
    return [single_token_shape, single_token_items, unsupported, how_w2 = std::move(how_w2), w2_packed,
            runs_shared](const Graph& g, const Node& n) {
      Support s = cuda_supports_bf16(g, n, "");
      if (!s.ok) return s;
      if (Support a = refuses_addends(n); !a.ok) return a;
      if (g.max_tokens_of(n) != 1)
        return Support::no("at most " + std::to_string(g.max_tokens_of(n)) + " tokens: it runs one token");
      const bool folded = static_cast<const FusedExpertsOp&>(*n.op).shared().has_value();
      if (folded && !runs_shared) return Support::no("a shared expert folded in: it runs the routed experts only");
      if (folded)
        if (const std::string why = fold_share_declined(fused_shape(g, n)); !why.empty()) return Support::no(why);
      const cuda::FusedSingleTokenShape shape = single_token_shape(g, n);
      if (const std::string why = unsupported(shape); !why.empty()) return Support::no(why);
      if (huge_experts(shape.hidden, shape.intermediate))
        return Support::no(expert_mib(shape.hidden, shape.intermediate) + ": the chain's decode kernels stream "
                           "such experts faster");
      if (w2_packed && g.value(n.inputs[4]).role != ValueRole::weight)
        return Support::no("w2 ('" + g.value(n.inputs[4]).name + "') is not a weight bound once, so it cannot be packed once");
      const int items = single_token_items(g, n);
      const std::string shared =
          folded ? "; the shared expert (S = " + std::to_string(shape.shared_intermediate) + ") folded in as " +
                       std::to_string(shape.shared_intermediate / 16) + " more items ahead of them, streamed while "
                       "the gate runs, added in the same ordered sum"
                 : std::string();
      return Support::yes("one token: its k experts' gate/up and down projections cut into " + std::to_string(items) +
                          " equal items of 16 features (" + how_w2 + "), no item waiting for a whole expert; partials "
                          "summed in order" + shared +
                          (items > kSingleTokenMostItems ? "; behind the two-phase kernel beyond " +
                                                               std::to_string(kSingleTokenMostItems) + " routed items"
                                                         : std::string()));
    };
  };
  // Beside a shared expert (another branch the concurrent plan runs at the same time) the quads
  // measured slower in the whole layer: qwen1.5 T=1, concurrent plan in a CUDA graph, 95.3 against
  // 92.2 µs (its routed branch alone 54.6 against 61.8; h100_fused_single_token_layer_2026-11-23.jsonl).
  // Its cooperative launch starts only once every block fits, so it waits for the SMs the shared
  // branch holds instead of filling them as they free up (the suspected cause; not traced). The w2t
  // kernel's launch is as cooperative: the same rule for both.
  auto single_token_preferred = [single_token_items](const Graph& g, const Node& n) {
    for (const Node& other : g.nodes())
      if (other.op->kind() == "shared_expert") return false;
    return single_token_items(g, n) <= kSingleTokenMostItems;
  };
  KernelEntry single_token = reading_live_tokens(launching(1, {"fused_experts", Backend::cuda, "cuda.fused_single_token", 1,
         single_token_supports(cuda::fused_single_token_unsupported, "w2 read in quads of 64", false, false),
         [single_token_shape](const KernelCall& c) {
           cuda::experts_fused_single_token(lane(c), single_token_shape(c.graph, c.node), c.tokens, c.live_tokens,
                                            bf16_in(c, 0), c.in<int32_t>(1), c.in<float>(2), bf16_in(c, 3),
                                            bf16_in(c, 4), bf16_out(c, 0), c.workspace);
         },
         [single_token_shape](const Graph& g, const Node& n, int64_t) {
           return cuda::fused_single_token_workspace_bytes(single_token_shape(g, n));
         }}));
  single_token.priority_on = [single_token_preferred](const Graph& g, const Node& n) {
    return single_token_preferred(g, n) ? 1 : -1;
  };
  r.add(std::move(single_token));
  // w2 read transposed, w2t [E, I, H], from a copy packed once at bind time (cuda::pack_w2_transposed):
  // an item's 16 features are 16 contiguous rows of w2t over all of H, so it needs no quad and no wait
  // but the final one. Measured in the probe (bench/probes/uniform_decode.cu, H100, T=1) 7% ahead of
  // the quads: qwen1.5 / qwen3 32.5 / 34.3 µs against 34.9 / 36.6. The copy costs a third of the routed
  // experts' weights more device memory; where it does not fit, the plan goes without packed weights
  // (PlanOptions::packed_weights) and the quads run. One above the quads wherever they are planned.
  // With a shared expert folded in (a layer's, T=1, where fold_share_declined() says it pays) its w2
  // is packed transposed too, after the routed experts' in the same copy, and the kernel starts while
  // the gate runs; ahead of the two-phase kernel's fold. Measured on the H100 (whole layer,
  // qwen1.5-moe-a2.7b T=1, 300 runs x 2 passes, bench/results/h100_layer_t1_w2t_folded_2026-11-24.jsonl):
  // CUDA graph 62.2 µs against 71.3, concurrent plan 69.6 against 78.5 (bench/NOTES.md, "The shared
  // expert in the one-token kernel").
  KernelEntry single_token_w2t = starting_early(reading_live_tokens(launching(1, {"fused_experts", Backend::cuda,
         "cuda.fused_single_token_w2t", 2,
         single_token_supports(cuda::fused_single_token_w2t_unsupported,
                               "w2 read transposed, from a copy packed once at bind time: each item's 16 rows over all "
                               "of H, no wait per quad",
                               true, true),
         [single_token_shape](const KernelCall& c) {
           if (c.packed == nullptr)
             fail_input("node '" + c.node.name + "' (cuda.fused_single_token_w2t): w2 was not packed transposed");
           const cuda::FusedSingleTokenShape s = single_token_shape(c.graph, c.node);
           const auto* w2t = static_cast<const uint16_t*>(c.packed);
           cuda::FusedSingleTokenShared shared;
           if (s.shared_intermediate > 0) {
             const cuda::FusedSharedWeights weights = fused_shared_weights(c);
             shared = {weights.w13, w2t + cuda::packed_w2t_bytes(s.experts, s.hidden, s.intermediate) / 2, weights.gate};
           }
           cuda::experts_fused_single_token_w2t(lane(c), s, c.tokens, c.live_tokens, bf16_in(c, 0), c.in<int32_t>(1),
                                                c.in<float>(2), bf16_in(c, 3), w2t, bf16_out(c, 0), c.workspace, shared,
                                                c.starts_early);
         },
         [single_token_shape](const Graph& g, const Node& n, int64_t) {
           return cuda::fused_single_token_w2t_workspace_bytes(single_token_shape(g, n));
         }})),
         // Where it has work that needs no routing: the folded shared expert's items.
         [](const Graph&, const Node& n) { return static_cast<const FusedExpertsOp&>(*n.op).shared().has_value(); });
  single_token_w2t.priority_on = [single_token_preferred](const Graph& g, const Node& n) {
    return single_token_preferred(g, n) ? 2 : -1;
  };
  single_token_w2t.packed_weight = PackedWeight{
      4, "w2 transposed [E, I, H]",
      [single_token_shape](const Graph& g, const Node& n) {
        const cuda::FusedSingleTokenShape s = single_token_shape(g, n);
        return cuda::packed_w2t_bytes(s.experts, s.hidden, s.intermediate) +
               cuda::packed_w2t_bytes(1, s.hidden, s.shared_intermediate);
      },
      [single_token_shape](const KernelCall& c, void* packed) {
        const cuda::FusedSingleTokenShape s = single_token_shape(c.graph, c.node);
        auto* w2t = static_cast<uint16_t*>(packed);
        cuda::pack_w2_transposed(bf16_in(c, 4), s.experts, s.hidden, s.intermediate, w2t, lane(c).stream);
        if (s.shared_intermediate > 0)  // the shared expert's w2 (input 6, [H, S]) after the routed experts'
          cuda::pack_w2_transposed(bf16_in(c, 6), 1, s.hidden, s.shared_intermediate,
                                   w2t + cuda::packed_w2t_bytes(s.experts, s.hidden, s.intermediate) / 2, lane(c).stream);
      },
      "cuda.fused_single_token",
      [single_token_shape](const Graph& g, const Node& n) {
        const cuda::FusedSingleTokenShape s = single_token_shape(g, n);
        return s.shared_intermediate > 0 ? "w2 transposed [E, I, H], then the shared expert's w2 transposed [S, H]"
                                         : "w2 transposed [E, I, H]";
      }};
  r.add(std::move(single_token_w2t));
  // Above one row per expert, the chain on the 64x256 tiles less its scatter: GEMM 1 gathers its rows
  // from x (cutlass_gathered above). Measured on the H100 (experts path in a CUDA graph, every kernel
  // forced in the same call, 2-3 passes; bench/NOTES.md "Gathering x in GEMM 1's loads"), µs, gather
  // / the chain on the same tiles: with the packed weight tiles, qwen3-30b-a3b T = 32 / 64 / 128 / 512
  // (2 / 4 / 8 / 32 rows per expert) 388-390 / 428-430 / 440-443 / 469-473 against 388-389 / 433-435 /
  // 446-451 / 481-486, qwen1.5-moe-a2.7b T = 32 / 64 / 512 340-344 / 374-382 / 400-401 against 345-351 /
  // 379-381 / 407-409, deepseek-v3 T = 128 / 512 / 1024 7277-7295 / 7606-7616 / 7833-7836 against
  // 7338-7348 / 7732-7743 / 7977-8001. From 96 rows (where the chain plans the unpacked 64x256 tiles),
  // on qwen's H = 2048 the packed tiles too: qwen3 T=2048 (128 rows) 563-565 against 579 (gather,
  // unpacked) and 598-601 (the chain as planned), qwen1.5 T=2048 (137) 477-478 against 492-494 and
  // 496; on deepseek-v3's H = 7168 the packed tiles re-read their operands from 64 rows ("Weights
  // packed tile by tile"), so there the unpacked ones: T = 3072 / 4096 (96 / 128 rows) 8488-8496 /
  // 9329-9356 against 8690-8715 / 9380-9472. Between 56 and 96 rows the chain's tile pairs stay.
  // On huge experts too (`moeflow tune`, nvidia-h100-x1, 2026-11-24, bench/NOTES.md "Gathering x in
  // GEMM 1's loads"): mixtral-8x7b T = 8 / 32 / 128 (2 / 8 / 32 rows per expert) 843 / 946 / 967 µs in
  // a CUDA graph against the decode kernel's 917 at T=8 and cuBLAS's grouped GEMM (host sync) 1041 /
  // 1071, and even with the chain's 64x256 tiles at T=512 (128 rows): 1103 against 1106.
  r.add(cutlass_gathered("cuda.cutlass_gather_tiles_narrow", true, cuda::CutlassTiles::narrow,
                         [](const cuda::FusedDecodeShape& s, double mean) {
    if (mean < kTilesBelowRows || (mean >= 96 && mean < 192 && s.hidden <= kTilesMostHiddenFrom96)) return std::string();
    return fmt(mean) + " rows/expert at max T" +
           (mean >= 96 && mean < 192 ? " with H = " + std::to_string(s.hidden) + " > " + std::to_string(kTilesMostHiddenFrom96)
                                     : std::string()) +
           ": the chain's tiles there";
  }));
  r.add(cutlass_gathered("cuda.cutlass_gather_swiglu_narrow", false, cuda::CutlassTiles::narrow,
                         [](const cuda::FusedDecodeShape& s, double mean) {
    if (huge_experts(s.hidden, s.intermediate)) return expert_mib(s.hidden, s.intermediate) + ": not measured on such experts";
    if (mean >= 96 && mean < 192 && s.hidden > kTilesMostHiddenFrom96) return std::string();
    return fmt(mean) + " rows/expert at max T with H = " + std::to_string(s.hidden) +
           ": outside [96, 192) rows with H above " + std::to_string(kTilesMostHiddenFrom96) + " (the gather reads the "
           "packed tiles there, or the chain's tiles run)";
  }));
  // GEMM 1 of the 128x256 tiles gathering its rows with three warps (the epilogue's producer warp too:
  // cutlass_epilogue_warp_loads.hpp). GEMM 1 alone it beat the dispatch's scatter + the TMA GEMM where
  // H = 2048 (bench/probes/gather_rows.cu, D from the registers for every variant: qwen3-30b-a3b T =
  // 8192 / 4096 816-851 / 535-536 against 880-891 / 610-621 µs, qwen1.5-moe-a2.7b T=8192 755-771
  // against 811-846), but the whole experts path in a CUDA graph did not (three passes,
  // bench/results/h100_wide_gather_engine_2026-11-24.txt), µs, the fused node / the chain on the same
  // tiles: qwen3 T = 4096 / 8192 833 / 1453 against 824 / 1412, qwen1.5 767 / 1236 against 741 / 1221;
  // under Nsight Compute its GEMM 1 took 864 µs against the TMA GEMM 1's 754 at qwen3 T=8192, as much
  // as the scatter it saves (106). So it is passed over everywhere: it runs where forced or tuned, and
  // `moeflow tune` measures it.
  r.add(cutlass_gathered("cuda.cutlass_gather_swiglu_wide_single", false, cuda::CutlassTiles::wide_single,
                         [](const cuda::FusedDecodeShape&, double mean) {
    return fmt(mean) + " rows/expert at max T: measured behind the chain on the same tiles (qwen3-30b-a3b, "
           "qwen1.5-moe-a2.7b at T = 4096 and 8192, 1-4%)";
  }));
}

}  // namespace

void register_cuda_comm_kernels(KernelRegistry& r);  // ops/cuda/cuda_comm_kernels.cpp

void register_cuda_kernels(KernelRegistry& r) {
  register_cuda_comm_kernels(r);
  r.add(launching(2, {"gate", Backend::cuda, "cuda.router_topk", 0,
         [](const Graph& g, const Node& n) {
           if (g.value(n.inputs[0]).dtype() != DType::bf16) return Support::no("x must be bf16 on CUDA");
           return Support::yes("cuBLAS bf16 logits in fp32, one warp per token for top-k");
         },
         [](const KernelCall& c) {
           const auto& op = static_cast<const GateOp&>(*c.node.op);
           float* logits = c.out<float>(2);
           cuda::gemm_bf16_nt(lane(c), c.tokens, op.rule().experts, hidden_of(c), bf16_in(c, 0), bf16_in(c, 1), logits, true);
           cuda::route_tokens(op.rule(), logits, op.rule().use_bias ? c.in<float>(2) : nullptr, c.tokens,
                              c.out<int32_t>(0), c.out<float>(1), lane(c).stream);
         },
         {}}));
  // A few tokens: logits and routing in one launch of our own (routing.hpp says why).
  r.add(releasing_next(launching(1, {"gate", Backend::cuda, "cuda.router_small", 1,
         [](const Graph& g, const Node& n) {
           if (g.value(n.inputs[0]).dtype() != DType::bf16) return Support::no("x must be bf16 on CUDA");
           const auto& op = static_cast<const GateOp&>(*n.op);
           std::string why;
           if (!cuda::route_small_supported(op.rule(), static_cast<int>(g.value(n.inputs[0]).shape()[1].fixed),
                                            g.max_tokens_of(n), &why))
             return Support::no(why);
           return Support::yes("at most " + std::to_string(cuda::kRouteSmallMaxTokens) +
                               " tokens: logits (fp32 from bf16, 1-8 warps per expert by H) and top-k in one launch");
         },
         [](const KernelCall& c) {
           const auto& op = static_cast<const GateOp&>(*c.node.op);
           cuda::route_tokens_small(lane(c), op.rule(), bf16_in(c, 0), bf16_in(c, 1), hidden_of(c), c.tokens,
                                    op.rule().use_bias ? c.in<float>(2) : nullptr, c.out<float>(2), c.out<int32_t>(0),
                                    c.out<float>(1), c.workspace);
         },
         [](const Graph&, const Node&, int64_t) { return cuda::route_small_workspace_bytes(); }})));
  // Four launches with Qwen2-MoE's sigmoid gate, three without.
  r.add(launching(4, {"shared_expert", Backend::cuda, "cuda.cublas_swiglu", 0,
         bf16_kernel("cuBLAS GEMM x*w13^T, SwiGLU kernel, cuBLAS GEMM act*w2^T (sigmoid gate kernel when gated)"),
         [](const KernelCall& c) {
           const auto& op = static_cast<const SharedExpertOp&>(*c.node.op);
           const int H = hidden_of(c), I = op.intermediate();
           auto* h = static_cast<uint16_t*>(c.workspace);
           auto* act = reinterpret_cast<uint16_t*>(static_cast<std::byte*>(c.workspace) +
                                                   align256(c.max_tokens() * 2 * I * 2));
           cuda::gemm_bf16_nt(lane(c), c.tokens, 2 * I, H, bf16_in(c, 0), bf16_in(c, 1), h, false);
           cuda::swiglu(h, c.tokens, I, act, lane(c).stream);
           cuda::gemm_bf16_nt(lane(c), c.tokens, H, I, act, bf16_in(c, 2), bf16_out(c, 0), false);
           if (op.gated()) cuda::scale_rows_by_sigmoid_gate(bf16_in(c, 0), bf16_in(c, 3), c.tokens, H, bf16_out(c, 0), lane(c).stream);
         },
         [](const Graph&, const Node& n, int64_t tokens) {
           const int64_t I = static_cast<const SharedExpertOp&>(*n.op).intermediate();
           return align256(tokens * 2 * I * 2) + align256(tokens * I * 2);
         }}));
  r.add(reading_live_tokens(launching(4, {"dispatch", Backend::cuda, "cuda.permute_rows", 0,
         bf16_kernel("counting sort on the device (per-expert counts, offsets, stable ranks), then each token's row read once "
                     "and written to its k slots (16-byte accesses where rows allow)"),
         [](const KernelCall& c) {
           const auto& op = static_cast<const DispatchOp&>(*c.node.op);
           const int64_t rows = c.max_tokens() * op.top_k();
           auto* local_ids = static_cast<int32_t*>(c.workspace);
           void* sort_ws = static_cast<std::byte*>(c.workspace) + align256(rows * 4);
           const std::size_t sort_bytes = cuda::permutation_workspace_bytes(c.max_tokens(), op.top_k(), op.experts());
           // A rank's share of the experts: its ids renumbered from 0, the others' -1, which the
           // permutation gives no slot (slot_of -1) and the scatter and combine therefore skip.
           const int32_t* ids = c.in<int32_t>(1);
           if (op.shared_out()) {
             cuda::localize_ids(ids, c.tokens * op.top_k(), op.share().first_expert, op.experts(), local_ids, lane(c).stream);
             ids = local_ids;
           }
           const cuda::LiveRows live{c.live_tokens, op.top_k()};
           cuda::build_permutation(ids, c.tokens, op.top_k(), op.experts(), c.out<int32_t>(1), c.out<int32_t>(2),
                                   nullptr, sort_ws, sort_bytes, lane(c).stream, live);
           cuda::scatter_rows(bf16_in(c, 0), c.out<int32_t>(2), c.tokens, op.top_k(), hidden_of(c), bf16_out(c, 0),
                              lane(c).stream, {c.live_tokens, 1});
         },
         [](const Graph&, const Node& n, int64_t tokens) {
           const auto& op = static_cast<const DispatchOp&>(*n.op);
           return align256(tokens * op.top_k() * 4) +
                  static_cast<int64_t>(cuda::permutation_workspace_bytes(tokens, op.top_k(), op.experts()));
         }})));
  register_experts(r);
  register_fused_experts(r);
  KernelEntry weighted_sum = reading_live_tokens({"combine", Backend::cuda, "cuda.weighted_sum", 0,
         bf16_kernel("one pass per token: its top-k expert rows weighted in fp32, no atomics"),
         [](const KernelCall& c) {
           const auto& op = static_cast<const CombineOp&>(*c.node.op);
           static_assert(CombineOp::kMaxAddends <= cuda::RowAddends::kMax);
           cuda::RowAddends addends;
           for (int a = 0; a < op.addends(); ++a) addends.rows[addends.count++] = bf16_in(c, 3 + static_cast<std::size_t>(a));
           cuda::combine_rows(bf16_in(c, 0), c.in<int32_t>(1), c.in<float>(2), c.tokens, op.top_k(), hidden_of(c),
                              bf16_out(c, 0), lane(c).stream, {}, cuda::LiveRows{c.live_tokens, 1}, addends);
         },
         {}});
  weighted_sum.in_place = {{0, 3}};  // over the first addend, where there is one (combine_rows reads it first)
  r.add(std::move(weighted_sum));
  KernelEntry sum{"reduce", Backend::cuda, "cuda.sum", 0, bf16_kernel("elementwise sum of the addends in fp32"),
                   [](const KernelCall& c) {
                     std::vector<const uint16_t*> addends;
                     for (std::size_t i = 0; i < c.inputs.size(); ++i) addends.push_back(bf16_in(c, i));
                     cuda::sum_rows(addends.data(), static_cast<int>(addends.size()),
                                    c.input_value(0).shape().elements(c.tokens), bf16_out(c, 0), lane(c).stream);
                   },
                   {}};
  sum.in_place = {{0, 0}};  // sum_rows: each element of the first addend is read by the thread that writes it
  r.add(std::move(sum));
  // The chunk pass's row copies; where the memory planner laid the rows out as views, source and
  // destination are the same bytes and nothing is issued.
  for (const auto& [kind, what] : {std::pair{"slice_rows", "one device-to-device copy of the chunk's rows"},
                                    std::pair{"concat_rows", "one device-to-device copy per chunk"}}) {
    KernelEntry e{kind, Backend::cuda, "cuda.copy_rows", 0,
                  [what](const Graph&, const Node&) { return Support::yes(what); },
                  [](const KernelCall& c) {
                    copy_chunk_rows(c.graph, c.node, c.inputs, c.outputs, c.tokens,
                                    [&](void* dst, const void* src, int64_t bytes) {
                                      if (dst == src || bytes <= 0) return;
                                      MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(bytes),
                                                                         cudaMemcpyDeviceToDevice, lane(c).stream));
                                    });
                  },
                  {}};
    e.row_views = true;
    r.add(std::move(e));
  }
  r.add({"to_host", Backend::cuda, "cuda.copy_and_wait", 0,
         [](const Graph&, const Node&) { return Support::yes("cudaMemcpyAsync to pinned memory, then the host waits"); },
         [](const KernelCall& c) {
           const int64_t bytes = c.input_value(0).bytes(c.tokens);
           MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(c.outputs[0], c.inputs[0], static_cast<std::size_t>(bytes),
                                              cudaMemcpyDeviceToHost, lane(c).stream));
           MOEFLOW_CUDA_CHECK(cudaStreamSynchronize(lane(c).stream));
         },
         {}});
}

}  // namespace moeflow
