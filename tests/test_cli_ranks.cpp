// `moeflow run` under mpirun as a user meets it: a multi-rank run checked rank by rank, bad layouts
// refused on every rank with status 2, ranks given other flags refused, a rank that dies stopping
// the others with a clear error instead of a hang, and plan/dot showing one rank's graph without
// mpirun. Skipped where mpirun is absent.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <sys/wait.h>

#include <nlohmann/json.hpp>

using testing::HasSubstr;

namespace {

struct Result {
  int status = -1;
  std::string output;  // stdout and stderr
  double seconds = 0.0;
};

Result shell(const std::string& command) {
  const auto t0 = std::chrono::steady_clock::now();
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  Result r;
  std::array<char, 4096> buffer{};
  while (pipe && fgets(buffer.data(), buffer.size(), pipe)) r.output += buffer.data();
  const int raw = pipe ? pclose(pipe) : -1;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

bool have_mpirun() { return std::system("command -v mpirun >/dev/null 2>&1") == 0; }

// `timeout` keeps a hang from stalling the suite: it would show as status 124.
std::string mpirun(int ranks, const std::string& args, const std::string& env = "") {
  return "timeout 120 mpirun --allow-run-as-root --oversubscribe " + env + " -np " + std::to_string(ranks) + " " +
         MOEFLOW_BINARY + " " + args;
}

const std::string kSmall =
    "--model qwen1.5-moe-a2.7b --set hidden_size=128 --set moe_intermediate_size=32 --set num_experts=8 "
    "--set shared_expert_intermediate_size=64 --threads 1 --runs 2 --warmup 0 --input-sets 1";

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (std::size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST(CliRanks, AlltoallRunChecksEveryRankAgainstItsTokens) {
  if (!have_mpirun()) GTEST_SKIP() << "no mpirun";
  const std::string trace = testing::TempDir() + "ranks_trace.json", svg = testing::TempDir() + "ranks_trace.svg";
  const Result r = shell(mpirun(2, "run " + kSmall + " --dp 2 --ep --dispatch alltoall --tokens 7,12 --chunks 2 --check --trace " + trace));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("dp=2 tp=1 ep alltoall tokens 7,12"));
  EXPECT_EQ(count(r.output, "PASS"), 2) << r.output;
  // One merged trace, a process row per rank, drawn with a row per (rank, lane).
  const Result json = shell("cat " + trace);
  EXPECT_EQ(count(json.output, "\"process_name\""), 2) << json.output.substr(0, 400);
  EXPECT_THAT(json.output, HasSubstr("dispatch_alltoall_back\u00b7c1"));
  const Result drawn = shell(std::string(MOEFLOW_BINARY) + " trace " + trace + " --svg " + svg + " && cat " + svg);
  ASSERT_EQ(drawn.status, 0) << drawn.output;
  EXPECT_THAT(drawn.output, HasSubstr("rank 0 lane0"));
  EXPECT_THAT(drawn.output, HasSubstr("rank 1 lane0"));
}

TEST(CliRanks, TensorParallelJsonNamesEveryRank) {
  if (!have_mpirun()) GTEST_SKIP() << "no mpirun";
  const Result r = shell(mpirun(4, "run " + kSmall + " --dp 2 --tp 2 --dispatch topk-allgather --tokens 9,4 --check --json"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(count(r.output, "\"pass\": true"), 4) << r.output;
  EXPECT_EQ(count(r.output, "\"tp_rank\": 1"), 2) << r.output;
}

TEST(CliRanks, BadLayoutsAreRefusedOnEveryRankWithStatus2) {
  if (!have_mpirun()) GTEST_SKIP() << "no mpirun";
  struct Bad {
    int ranks;
    std::string flags, message;
  };
  const Bad cases[] = {
      {3, "--dp 2 --tokens 4", "--dp 2 x --tp 1 = 2 ranks, but mpirun started 3"},
      {2, "--dp 2 --ep --set num_experts=7 --set num_experts_per_tok=2 --tokens 4", "7 experts do not divide over 2 ranks"},
      {2, "--dp 2 --set moe_intermediate_size=33 --tokens 4", "intermediate size 33 does not divide over 2 ranks"},
      {2, "--dp 2 --tokens 4,5,6", "--tokens gives 3 counts for 2 DP ranks"},
      {2, "--dp 2 --tokens 4,0", "must be >= 1"},
  };
  for (const Bad& b : cases) {
    const Result r = shell(mpirun(b.ranks, "run " + kSmall + " " + b.flags));
    EXPECT_EQ(r.status, 2) << b.flags << "\n" << r.output;
    // One line per rank, each naming its rank.
    EXPECT_EQ(count(r.output, b.message), b.ranks) << r.output;
    for (int rank = 0; rank < b.ranks; ++rank)
      EXPECT_THAT(r.output, HasSubstr("error: rank " + std::to_string(rank) + " of " + std::to_string(b.ranks) + ": "))
          << r.output;
  }
}

TEST(CliRanks, RanksGivenOtherFlagsAreRefused) {
  if (!have_mpirun()) GTEST_SKIP() << "no mpirun";
  const std::string one = std::string(MOEFLOW_BINARY) + " run " + kSmall + " --dp 2 --tokens 4";
  const Result r = shell("timeout 120 mpirun --allow-run-as-root --oversubscribe -np 1 " + one + " --seed 1 : -np 1 " +
                         one + " --seed 2");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("ranks 1 run another graph or configuration than rank 0"));
}

TEST(CliRanks, ARankThatDiesStopsTheOthersWithStatus3) {
  if (!have_mpirun()) GTEST_SKIP() << "no mpirun";
  const Result r = shell(mpirun(3, "run " + kSmall + " --dp 3 --ep --set num_experts=6 --tokens 8", "-x MOEFLOW_TEST_DIE_RANK=1"));
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.status, 124) << "the surviving ranks hung\n" << r.output;
  EXPECT_LT(r.seconds, 60.0);
  // Each survivor says why it stopped.
  EXPECT_THAT(r.output, HasSubstr("rank 0 of 3 stopped: a peer rank was lost"));
  EXPECT_THAT(r.output, HasSubstr("rank 2 of 3 stopped: a peer rank was lost"));
}

// A rank alive but stuck (it never enters the first collective): the others give up at the deadline
// with status 3 and say where they waited, instead of waiting forever.
TEST(CliRanks, ARankThatHangsStopsTheOthersAtTheDeadlineWithStatus3) {
  if (!have_mpirun()) GTEST_SKIP() << "no mpirun";
  const Result r = shell(mpirun(3, "run " + kSmall + " --dp 3 --ep --set num_experts=6 --tokens 8",
                                "-x MOEFLOW_TEST_HANG_RANK=1 -x MOEFLOW_PEER_TIMEOUT=2"));
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.status, 124) << "the ranks hung\n" << r.output;
  EXPECT_LT(r.seconds, 60.0);
  EXPECT_THAT(r.output, HasSubstr("MPI_Barrier had not returned after 2 s: a peer rank is alive but never entered it"));
  EXPECT_THAT(r.output, testing::ContainsRegex("rank (0|2) of 3: MPI_Barrier had not returned"));
}

TEST(CliRanks, ABadPeerTimeoutIsRefused) {
  if (!have_mpirun()) GTEST_SKIP() << "no mpirun";
  const Result r = shell(mpirun(2, "run " + kSmall + " --dp 2 --tokens 4", "-x MOEFLOW_PEER_TIMEOUT=soon"));
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("MOEFLOW_PEER_TIMEOUT=soon: expected a number of seconds, at least 1"));
}

// One rank's GPU plan, planned here without a GPU or NCCL: bf16 values, the NCCL exchanges.
TEST(CliRanks, PlanShowsOneRanksGpuPlan) {
  const Result plan = shell(std::string(MOEFLOW_BINARY) + " plan " + kSmall.substr(0, kSmall.find(" --threads")) +
                            " --backend cuda --dp 2 --ep --dispatch alltoall --tokens 16 --rank 1 --chunks 2 --plan concurrent");
  if (plan.status != 0 && plan.output.find("no CUDA backend") != std::string::npos) GTEST_SKIP() << "a build without CUDA";
  ASSERT_EQ(plan.status, 0) << plan.output;
  EXPECT_THAT(plan.output, HasSubstr("backend cuda"));
  EXPECT_THAT(plan.output, HasSubstr("nccl.alltoall_v"));
  EXPECT_THAT(plan.output, HasSubstr("dispatch_alltoall_back\u00b7c1"));
}

TEST(CliRanks, WithoutMpirunTheLayoutNamesTheLauncher) {
  const Result r = shell(std::string(MOEFLOW_BINARY) + " run " + kSmall + " --dp 2 --tokens 4");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("start moeflow under mpirun"));
}

TEST(CliRanks, PlanAndDotShowOneRanksGraphWithTheBytesItMoves) {
  const Result dot = shell(std::string(MOEFLOW_BINARY) + " dot " + kSmall.substr(0, kSmall.find(" --threads")) +
                           " --dp 2 --ep --dispatch alltoall --tokens 40,24 --rank 1");
  ASSERT_EQ(dot.status, 0) << dot.output;
  EXPECT_THAT(dot.output, HasSubstr("dispatch_alltoall|alltoall rows to their experts' ranks (4 experts per rank), world rows 40+24"));
  EXPECT_THAT(dot.output, HasSubstr("moves "));
  EXPECT_THAT(dot.output, HasSubstr("fillcolor=gold"));
  const Result plan = shell(std::string(MOEFLOW_BINARY) + " plan " + kSmall.substr(0, kSmall.find(" --threads")) +
                            " --dp 2 --tp 2 --tokens 16 --rank 3 --chunks 2");
  ASSERT_EQ(plan.status, 0) << plan.output;
  EXPECT_THAT(plan.output, HasSubstr("dispatch_reduce_scatter\u00b7c1"));
  EXPECT_THAT(plan.output, HasSubstr("dispatch_tp_gather\u00b7c0"));
  const Result bad = shell(std::string(MOEFLOW_BINARY) + " plan " + kSmall.substr(0, kSmall.find(" --threads")) +
                           " --dp 2 --tokens 16 --rank 2");
  EXPECT_EQ(bad.status, 2) << bad.output;
  EXPECT_THAT(bad.output, HasSubstr("--rank 2 outside the 2 ranks"));
}

TEST(CliRanks, BenchRowsCarryTheExchangeAndTheSpreadOfTheHiddenFraction) {
  if (!have_mpirun()) GTEST_SKIP() << "no mpirun";
  const std::string json = testing::TempDir() + "ranks_bench.jsonl";
  const Result r = shell(mpirun(2, "bench --backend cpu --models qwen1.5-moe-a2.7b --set hidden_size=128 "
                                   "--set moe_intermediate_size=32 --set num_experts=8 --set shared_expert_intermediate_size=64 "
                                   "--threads 1 --runs 5 --tokens 24 --dp 2 --ep --dispatches alltoall --chunks 2 "
                                   "--plans serial,concurrent --json " + json));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("2 ranks (dp=2 tp=1 ep)"));
  std::ifstream in(json);
  std::string line;
  int rows = 0;
  while (std::getline(in, line)) {
    const auto row = nlohmann::json::parse(line);
    ++rows;
    EXPECT_EQ(row["dispatch"], "alltoall");
    EXPECT_GT(row["dispatch_bytes_per_rank"].get<double>(), 0.0) << line;
    EXPECT_LE(row["time_p25_us"].get<double>(), row["time_us"].get<double>()) << line;
    EXPECT_LE(row["time_us"].get<double>(), row["time_p75_us"].get<double>()) << line;
    if (row["plan"] == "serial") {
      EXPECT_TRUE(row.contains("alone")) << line;
    } else {
      const auto q = row["comm_hidden_quartiles"];
      ASSERT_EQ(q.size(), 2u) << line;
      EXPECT_LE(q[0].get<double>(), row["comm_hidden"].get<double>()) << line;
      EXPECT_LE(row["comm_hidden"].get<double>(), q[1].get<double>()) << line;
    }
  }
  EXPECT_EQ(rows, 2);
}
