// The `moeflow` command as a user meets it: exit statuses (0 ok, 1 check failed, 2 bad input,
// 3 resources), one-line errors that name what is wrong, and the files it writes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <set>
#include <fstream>
#include <iomanip>
#include <sstream>
#include <sys/wait.h>

#include "bench/cpu_session.hpp"
#include "ops/moe_layer.hpp"

using testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

struct Result {
  int status = -1;
  std::string output;  // stdout and stderr
};

Result run_moeflow(const std::string& args) {
  const std::string command = std::string(MOEFLOW_BINARY) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  Result r;
  std::array<char, 4096> buffer{};
  while (pipe && fgets(buffer.data(), buffer.size(), pipe)) r.output += buffer.data();
  const int raw = pipe ? pclose(pipe) : -1;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  return r;
}

const char* kSmallQwen =
    "--model qwen1.5-moe-a2.7b --set hidden_size=128 --set moe_intermediate_size=32 "
    "--set shared_expert_intermediate_size=64 --threads 2 --runs 1 --budget 0";

fs::path temp_dir() {
  fs::path d = fs::temp_directory_path() / ("moeflow_cli_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

void expect_bad_input(const std::string& args, const std::string& mentions) {
  const Result r = run_moeflow(args);
  EXPECT_EQ(r.status, 2) << args << "\n" << r.output;
  EXPECT_THAT(r.output, HasSubstr(mentions)) << args;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << "one line expected:\n" << r.output;
}

}  // namespace

TEST(Cli, RunWithCheckPassesAndPrintsTheTable) {
  const Result r = run_moeflow(std::string("run ") + kSmallQwen + " --tokens 17 --plan concurrent --check");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("PASS"));
  EXPECT_THAT(r.output, HasSubstr("median ms"));
  EXPECT_THAT(r.output, HasSubstr("predicted us"));
  EXPECT_THAT(r.output, HasSubstr("shared_expert"));
}

TEST(Cli, RunJsonCarriesTheCheckAndEveryNode) {
  const Result r = run_moeflow(std::string("run ") + kSmallQwen + " --tokens 5 --max-tokens 9 --check --json");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["tokens"], 5);
  EXPECT_EQ(j["max_tokens"], 9);
  EXPECT_TRUE(j["check"]["pass"].get<bool>());
  EXPECT_LT(j["check"]["rel_norm"].get<double>(), 1e-5);
  // gate, shared expert, dispatch, experts, combine: the reduce folded into the combine, which adds
  // the shared expert's output (ops/fold_shared_add.hpp).
  EXPECT_EQ(j["nodes"].size(), 5u);
}

TEST(Cli, TraceOfConcurrentPlanShowsSharedExpertBesideRoutedPath) {
  const fs::path dir = temp_dir();
  const std::string trace = (dir / "run.json").string();
  const Result r = run_moeflow("run --model qwen1.5-moe-a2.7b --set hidden_size=512 --set moe_intermediate_size=256 "
                           "--set shared_expert_intermediate_size=2048 --threads 2 --runs 1 --budget 0 --tokens 256 "
                           "--plan concurrent --trace " + trace);
  ASSERT_EQ(r.status, 0) << r.output;
  const moeflow::Trace t = moeflow::Trace::read_chrome_json(trace);
  const moeflow::TraceEvent* shared = nullptr;
  double routed_start = 1e30, routed_end = 0;
  for (const auto& e : t.events) {
    if (e.name == "shared_expert") shared = &e;
    if (e.name == "dispatch" || e.name == "experts" || e.name == "combine" || e.name == "gate") {
      routed_start = std::min(routed_start, e.start_us);
      routed_end = std::max(routed_end, e.start_us + e.duration_us);
    }
  }
  ASSERT_NE(shared, nullptr);
  const double overlap = std::min(shared->start_us + shared->duration_us, routed_end) - std::max(shared->start_us, routed_start);
  EXPECT_GT(overlap, 0.0) << "the shared expert should run while the routed path runs";
  // The summary: the span, every lane's busy time, and the shared expert's time on its own row.
  const Result sum = run_moeflow("trace " + trace + " --summary");
  ASSERT_EQ(sum.status, 0) << sum.output;
  EXPECT_THAT(sum.output, HasSubstr(" us, 5 nodes"));  // the reduce folded into the combine
  EXPECT_THAT(sum.output, HasSubstr("% of the span)"));
  std::ostringstream shared_row;
  shared_row << std::fixed << std::setprecision(1) << shared->duration_us;
  EXPECT_THAT(sum.output, testing::ContainsRegex("shared_expert +cpu\\.swiglu_mlp +1 +" + shared_row.str())) << sum.output;
  const std::string svg = (dir / "timeline.svg").string();
  if (std::system("command -v neato >/dev/null") == 0) {
    const Result tr = run_moeflow("trace " + trace + " --svg " + svg);
    EXPECT_EQ(tr.status, 0) << tr.output;
    EXPECT_TRUE(fs::file_size(svg) > 0);
  }
}

TEST(Cli, DotIsIdenticalAcrossRunsAndRendersWithGraphviz) {
  const fs::path dir = temp_dir();
  const std::string a = (dir / "a.dot").string(), b = (dir / "b.dot").string();
  ASSERT_EQ(run_moeflow("dot --model qwen1.5-moe-a2.7b --max-tokens 64 -o " + a).status, 0);
  ASSERT_EQ(run_moeflow("dot --model qwen1.5-moe-a2.7b --max-tokens 64 -o " + b).status, 0);
  std::stringstream sa, sb;
  sa << std::ifstream(a).rdbuf();
  sb << std::ifstream(b).rdbuf();
  EXPECT_EQ(sa.str(), sb.str());
  for (const char* op : {"gate", "shared_expert", "dispatch", "experts", "combine", "reduce"})
    EXPECT_THAT(sa.str(), HasSubstr(std::string("{") + op + "|"));
  const std::string plan = (dir / "plan.dot").string();
  const Result p = run_moeflow("plan --model deepseek-v3 --max-tokens 8192 --plan concurrent --memory -o " + plan);
  EXPECT_EQ(p.status, 0) << p.output;  // planning never allocates weights, so any preset plans here
  EXPECT_THAT(p.output, HasSubstr("peak workspace"));
  if (std::system("command -v dot >/dev/null") == 0) {
    EXPECT_EQ(std::system(("dot -Tsvg " + a + " -o " + (dir / "a.svg").string()).c_str()), 0);
    EXPECT_EQ(std::system(("dot -Tsvg " + plan + " -o " + (dir / "plan.svg").string()).c_str()), 0);
  }
}

TEST(Cli, BadInputIsOneLineAndStatusTwo) {
  expect_bad_input("run --model no-such-model --tokens 4", "no-such-model");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 0", "--tokens = 0");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens -3", "--tokens = -3");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens abc", "abc");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 65 --max-tokens 64", "exceeds --max-tokens = 64");
  expect_bad_input(std::string("run ") + kSmallQwen + " --set no_such_field=1", "no_such_field");
  expect_bad_input(std::string("run ") + kSmallQwen + " --set num_experts_per_tok=61", "num_experts_per_tok");
  expect_bad_input(std::string("run ") + kSmallQwen + " --set num_experts_per_tok=0", "num_experts_per_tok");
  expect_bad_input(std::string("run ") + kSmallQwen + " --set hidden_size=0", "hidden_size");
  expect_bad_input(std::string("run ") + kSmallQwen + " --set moe_intermediate_size=-5", "moe_intermediate_size");
  expect_bad_input("run --model deepseek-v3 --set n_group=7 --tokens 4", "n_group");
  expect_bad_input("run --model deepseek-v3 --set topk_group=9 --tokens 4", "topk_group");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --no-such-flag", "no-such-flag");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --plan sideways", "sideways");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --kernel experts=nope", "nope");
  expect_bad_input("dot --model mixtral-8x7b --hf-config x.json", "not both");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --chunks 0", "--chunks: 0 is not positive");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --chunk-tokens -2", "--chunk-tokens: -2 is not positive");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --chunks 2 --chunk-tokens 2", "excludes");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --chunks two", "--chunks: 'two' is not a number");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --max-tokens 8 --chunk-tokens 9", "exceeds the maximum tokens 8");
  expect_bad_input("bench --backend cpu --models mixtral-8x7b --tokens 4 --plans graph-any", "plan 'graph-any'");
  expect_bad_input("bench --backend cpu --models mixtral-8x7b --tokens 4 --passes 0", "--passes");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --warmup -1", "--warmup: -1 is negative");
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --seed -1", "--seed: -1 is negative");  // not 2^64 - 1
  expect_bad_input(std::string("run ") + kSmallQwen + " --tokens 4 --budget 1e", "--budget: '1e' is not a number");
  expect_bad_input("bench --backend cpu --models mixtral-8x7b --tokens 4 --passes two", "two");
  expect_bad_input("bench --backend cpu --models mixtral-8x7b --tokens 4 --max-lanes 0", "--max-lanes");
}

TEST(Cli, BenchMaxLanesBoundsTheConcurrentPlansLanes) {
  // The layer with its shared expert: two lanes as planned on this machine, one with --max-lanes 1.
  auto lanes_of = [](const std::string& flags) {
    const fs::path json = temp_dir() / "lanes.jsonl";
    const Result r = run_moeflow(
        "bench --backend cpu --models qwen1.5-moe-a2.7b --set hidden_size=256 --set moe_intermediate_size=64 "
        "--set shared_expert_intermediate_size=256 --threads 2 --runs 1 --budget 0 --tokens 64 --plans concurrent "
        "--scope layer --json " + json.string() + " " + flags);
    EXPECT_EQ(r.status, 0) << r.output;
    std::ifstream in(json);
    std::string line;
    std::getline(in, line);
    return nlohmann::json::parse(line).at("lanes").get<int>();
  };
  EXPECT_EQ(lanes_of("--max-lanes 1"), 1);
  EXPECT_GE(lanes_of(""), 2);
}

// `moeflow bench` on the CPU over the small qwen1.5 layer with `flags`, and the JSON rows it wrote.
struct BenchRun {
  Result result;
  std::vector<nlohmann::json> rows;
};
BenchRun bench_small_qwen(const std::string& flags) {
  const fs::path json = temp_dir() / "bench_rows.jsonl";
  fs::remove(json);
  BenchRun b{run_moeflow("bench --backend cpu --models qwen1.5-moe-a2.7b --set hidden_size=128 --set "
                         "moe_intermediate_size=32 --set shared_expert_intermediate_size=64 --threads 2 --runs 1 "
                         "--budget 0 " + flags + " --json " + json.string()),
             {}};
  std::ifstream in(json);
  for (std::string line; std::getline(in, line);) b.rows.push_back(nlohmann::json::parse(line));
  return b;
}

TEST(Cli, BenchLayerScopeTimesEveryPlanOnOneSetOfWeights) {
  // Each plan's graph is rewritten by its own fusion and folding, so the sessions' planned graphs are
  // different objects; they still share the first one's weights (once refused: only plans of one
  // graph object could share, and a layer with a shared expert failed on its second plan).
  const BenchRun b = bench_small_qwen("--tokens 4 --plans serial,concurrent --scope layer");
  EXPECT_EQ(b.result.status, 0) << b.result.output;
  ASSERT_EQ(b.rows.size(), 2u) << b.result.output;
  EXPECT_EQ(b.rows[0].at("plan"), "serial");
  EXPECT_EQ(b.rows[1].at("plan"), "concurrent");
  EXPECT_TRUE(b.rows[1].at("ratio_serial").is_number());
  // The printed table ends in the fewest rows a touched expert got (4 tokens, top-4 of 60: a few).
  EXPECT_THAT(b.result.output, HasSubstr("x serial  fewest rows"));
  EXPECT_GE(b.rows[1].at("fewest_expert_rows").get<int>(), 1);
}

TEST(Cli, BenchPassesRepeatTheSweepAndSummariseEachPoint) {
  const BenchRun b = bench_small_qwen("--tokens 4,9 --plans serial --scope experts --passes 3");
  EXPECT_EQ(b.result.status, 0) << b.result.output;
  EXPECT_THAT(b.result.output, HasSubstr("== pass 3 of 3"));
  EXPECT_THAT(b.result.output, HasSubstr("over passes"));
  EXPECT_THAT(b.result.output, HasSubstr("scope=experts preset=qwen1.5-moe-a2.7b T=9 chunks=1 plan=serial"));
  std::multiset<std::pair<int, int>> seen;  // (pass, T)
  for (const auto& row : b.rows) seen.insert({row.at("pass").get<int>(), row.at("T").get<int>()});
  EXPECT_EQ(seen, (std::multiset<std::pair<int, int>>{{0, 4}, {0, 9}, {1, 4}, {1, 9}, {2, 4}, {2, 9}}));
}

TEST(Cli, BenchChunksPrintTheBestChunkedOverTheBestUnchunkedRow) {
  const BenchRun b = bench_small_qwen("--tokens 64 --plans serial,concurrent --scope experts --chunks 1,2 --passes 2");
  EXPECT_EQ(b.result.status, 0) << b.result.output;
  // The ratio the summary prints is the JSON rows' best 2-chunk time over their best unchunked one.
  std::vector<double> best[2] = {{1e300, 1e300}, {1e300, 1e300}};  // [chunks - 1][pass]
  for (const auto& row : b.rows)
    best[row.at("chunks").get<int>() - 1][row.at("pass").get<int>()] =
        std::min(best[row.at("chunks").get<int>() - 1][row.at("pass").get<int>()], row.at("time_us").get<double>());
  std::ostringstream expected;
  expected << std::fixed << std::setprecision(3) << " over 2 passes: " << best[1][0] / best[0][0] << " "
           << best[1][1] / best[0][1] << ")  fewest rows ";
  EXPECT_THAT(b.result.output, HasSubstr("chunked / unchunked"));
  EXPECT_THAT(b.result.output, HasSubstr("experts qwen1.5-moe-a2.7b  T=64      2 chunks "));
  EXPECT_THAT(b.result.output, HasSubstr(expected.str()));
}

TEST(Cli, TuningCacheFlagsAndTuneWithoutAGpu) {
  const fs::path bad = temp_dir() / "bad_tuning.json";
  std::ofstream(bad.string()) << "{\"version\": 1, \"entries\": 3}";
  const std::string model = "--model qwen1.5-moe-a2.7b --set hidden_size=128 --set moe_intermediate_size=32 "
                            "--set shared_expert_intermediate_size=64";
  expect_bad_input("plan " + model + " --max-tokens 8 --tuning-cache " + bad.string(), "bad_tuning.json");
  // A missing cache is an empty one: the plan is the heuristic's.
  const Result plan = run_moeflow("plan " + model + " --max-tokens 8 --tuning-cache " +
                                  (temp_dir() / "none.json").string() + " --tuning-device any");
  EXPECT_EQ(plan.status, 0) << plan.output;
  EXPECT_THAT(plan.output, HasSubstr("cpu.grouped_swiglu"));
  // tune measures GPU kernels: status 3 (resources) on a machine without one.
  const Result tune = run_moeflow("tune --models mixtral-8x7b --tokens 1 --cache " + (temp_dir() / "t.json").string());
  EXPECT_EQ(tune.status, 3) << tune.output;
  EXPECT_THAT(tune.output, HasSubstr("tune:"));
}

TEST(Cli, ChunkedRunChecksWithEmptyChunksAndNamesItsNodes) {
  // T = 3 of at most 16 in 4 chunks of 4 tokens: chunks 1..3 are empty and still run.
  const Result r =
      run_moeflow(std::string("run ") + kSmallQwen + " --tokens 3 --max-tokens 16 --chunks 4 --plan concurrent --check --json");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_TRUE(j["check"]["pass"].get<bool>());
  std::set<std::string> names;
  for (const auto& n : j["nodes"]) names.insert(n["node"].get<std::string>());
  EXPECT_TRUE(names.count("experts\u00b7c3")) << r.output;
  EXPECT_TRUE(names.count("concat_reduce.out")) << r.output;
  EXPECT_EQ(j["nodes"].size(), 4u * 6u + 1u);  // slice + five ops per chunk (each reduce in its combine), one concat
}

TEST(Cli, MalformedIncompleteAndUnsupportedConfigsAreRefusedByField) {
  const fs::path dir = temp_dir();
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream((dir / name).string()) << text;
    return (dir / name).string();
  };
  expect_bad_input("dot --hf-config " + write("broken.json", "{\"model_type\": \"mixtral\", "), "broken.json");
  expect_bad_input("dot --hf-config " + write("partial.json", R"({"model_type": "mixtral", "hidden_size": 64})"),
                   "is missing");
  expect_bad_input("dot --hf-config " +
                       write("gelu.json", R"({"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 32,
                                             "num_local_experts": 4, "num_experts_per_tok": 2, "hidden_act": "gelu"})"),
                   "hidden_act");
  expect_bad_input("dot --hf-config " +
                       write("scoring.json", R"({"model_type": "deepseek_v3", "hidden_size": 64, "moe_intermediate_size": 32,
                                                "n_routed_experts": 16, "num_experts_per_tok": 2, "scoring_func": "tanh"})"),
                   "scoring_func");
  expect_bad_input("dot --hf-config " + (dir / "missing.json").string(), "missing.json");
  const Result ok = run_moeflow("dot --hf-config " +
                            write("ok.json", R"({"model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 32,
                                                "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true,
                                                "num_hidden_layers": 48, "vocab_size": 151936})"));
  EXPECT_EQ(ok.status, 0) << ok.output;  // fields that do not affect one MoE layer are ignored
}

TEST(Cli, WeightsThatDoNotFitAreRefusedWithStatusThree) {
  const moeflow::MoEConfig c = moeflow::load_config("deepseek-v3");
  auto g = std::make_shared<const moeflow::Graph>(moeflow::build_moe_layer(c, {.max_tokens = 64}));
  const int64_t need = moeflow::CpuSession::bytes_needed(moeflow::make_plan(g, {}));
  if (moeflow::available_host_bytes() > need) GTEST_SKIP() << "this machine can hold deepseek-v3 in fp32";
  const Result r = run_moeflow("run --model deepseek-v3 --tokens 64 --check");
  EXPECT_EQ(r.status, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("GiB"));
  EXPECT_THAT(r.output, HasSubstr("deepseek-v3"));
}

TEST(Cli, CudaBackendWithoutCudaIsAResourceError) {
  const Result r = run_moeflow(std::string("run ") + kSmallQwen + " --tokens 4 --backend cuda");
  EXPECT_EQ(r.status, 3) << r.output;
}

// `run --weights` on the golden layers of tests/golden_hf (checkpoints written by transformers):
// the config.json beside the checkpoint is read, --check passes, and the routing against the
// reference is reported (top-k sets that differ, and the closest call's score gap).
TEST(Cli, RunWeightsOfTheGoldenLayersChecks) {
  const std::vector<std::pair<std::string, int>> layers{
      {"mixtral", 1}, {"qwen2_moe", 0}, {"qwen3_moe", 2}, {"deepseek_v2", 1}, {"deepseek_v3", 3}};
  for (const auto& [family, layer] : layers) {
    const std::string dir = std::string(MOEFLOW_SOURCE_DIR) + "/tests/golden_hf/" + family;
    const Result r = run_moeflow("run --weights " + dir + " --layer " + std::to_string(layer) +
                                 " --tokens 32 --check --threads 2 --runs 1 --budget 0");
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_THAT(r.output, HasSubstr("PASS"));
    EXPECT_THAT(r.output, HasSubstr("tokens' top-k sets differ"));
    EXPECT_THAT(r.output, HasSubstr("routing margin: closest top-k decision by a score gap of"));
    const Result j = run_moeflow("run --weights " + dir + "/model.safetensors --layer " + std::to_string(layer) +
                                 " --tokens 7 --check --json --threads 2 --runs 1 --budget 0");
    ASSERT_EQ(j.status, 0) << j.output;
    const auto check = nlohmann::json::parse(j.output)["check"];
    EXPECT_EQ(check["tokens_differing"], 0);
    EXPECT_GT(check["min_routing_margin"].get<double>(), 0.0);
  }
  // A layer the checkpoint does not hold is refused by tensor name.
  const Result missing = run_moeflow("run --weights " + std::string(MOEFLOW_SOURCE_DIR) +
                                     "/tests/golden_hf/mixtral --layer 0 --tokens 4 --runs 1 --budget 0");
  EXPECT_EQ(missing.status, 2) << missing.output;
  EXPECT_THAT(missing.output, HasSubstr("model.layers.0.block_sparse_moe."));
}
