// The MPI transport of comm::Communicator on random data (never zeros), run under mpirun with 2 and
// 4 ranks: every collective against the same sums computed on every rank from the counter-based
// generator, sub-groups from split(), uneven all-to-all-v including empty blocks, and errors.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "graph/error.hpp"
#include "kernels/comm/communicator.hpp"
#include "kernels/common/random.hpp"

using namespace moeflow;

namespace {

// Rank r's value i of stream `name`: every rank can compute every other rank's data.
float value_of(const char* name, int r, int64_t i) {
  return rng::uniform_pm1(rng::stream_key(static_cast<uint64_t>(r) + 1, rng::name_key(name)), static_cast<uint64_t>(i));
}

std::vector<float> data_of(const char* name, int r, int64_t n) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = value_of(name, r, i);
  return v;
}

}  // namespace

TEST(MpiComm, AllGatherPutsEveryRanksBlockInRankOrder) {
  auto world = comm::mpi_world();
  const int n = world->size();
  ASSERT_GE(n, 2) << "run under mpirun -np 2 or more";
  const int64_t count = 37;
  const std::vector<float> mine = data_of("gather", world->rank(), count);
  std::vector<float> all(static_cast<std::size_t>(count * n), 0.0f);
  world->all_gather(mine.data(), all.data(), count, comm::Element::f32);
  for (int r = 0; r < n; ++r)
    for (int64_t i = 0; i < count; ++i) ASSERT_EQ(all[static_cast<std::size_t>(r * count + i)], value_of("gather", r, i));
}

TEST(MpiComm, ReduceScatterAndAllReduceSumOverRanks) {
  auto world = comm::mpi_world();
  const int n = world->size();
  const int64_t count = 29;
  const std::vector<float> mine = data_of("sum", world->rank(), count * n);
  std::vector<float> block(static_cast<std::size_t>(count));
  world->reduce_scatter_sum(mine.data(), block.data(), count, comm::Element::f32);
  std::vector<float> total = mine;
  world->all_reduce_sum(total.data(), total.data(), count * n, comm::Element::f32);  // in place
  for (int64_t i = 0; i < count * n; ++i) {
    double expect = 0;
    for (int r = 0; r < n; ++r) expect += value_of("sum", r, i);
    ASSERT_NEAR(total[static_cast<std::size_t>(i)], expect, 1e-5);
    if (i / count == world->rank()) {
      ASSERT_NEAR(block[static_cast<std::size_t>(i % count)], expect, 1e-5);
    }
  }
}

TEST(MpiComm, AllToAllVMovesUnevenBlocksIncludingEmptyOnes) {
  auto world = comm::mpi_world();
  const int n = world->size(), me = world->rank();
  // Rank s sends (s + d) % 3 elements to rank d: some blocks are empty.
  auto count_from_to = [](int s, int d) { return static_cast<int64_t>((s + d) % 3); };
  std::vector<int64_t> sc(static_cast<std::size_t>(n)), so(sc.size()), rc(sc.size()), ro(sc.size());
  int64_t send_total = 0, recv_total = 0;
  for (int r = 0; r < n; ++r) {
    sc[static_cast<std::size_t>(r)] = count_from_to(me, r);
    so[static_cast<std::size_t>(r)] = send_total;
    send_total += sc[static_cast<std::size_t>(r)];
    rc[static_cast<std::size_t>(r)] = count_from_to(r, me);
    ro[static_cast<std::size_t>(r)] = recv_total;
    recv_total += rc[static_cast<std::size_t>(r)];
  }
  std::vector<int32_t> out(static_cast<std::size_t>(std::max<int64_t>(recv_total, 1)), -1), in(static_cast<std::size_t>(std::max<int64_t>(send_total, 1)));
  for (int r = 0; r < n; ++r)  // element j of the block for rank r encodes (sender, receiver, j)
    for (int64_t j = 0; j < sc[static_cast<std::size_t>(r)]; ++j)
      in[static_cast<std::size_t>(so[static_cast<std::size_t>(r)] + j)] = static_cast<int32_t>(me * 10000 + r * 100 + j);
  world->all_to_all_v(in.data(), sc.data(), so.data(), out.data(), rc.data(), ro.data(), comm::Element::i32);
  for (int r = 0; r < n; ++r)
    for (int64_t j = 0; j < rc[static_cast<std::size_t>(r)]; ++j)
      ASSERT_EQ(out[static_cast<std::size_t>(ro[static_cast<std::size_t>(r)] + j)], r * 10000 + me * 100 + j);
}

TEST(MpiComm, SplitMakesGroupsOrderedByKey) {
  auto world = comm::mpi_world();
  const int n = world->size(), me = world->rank();
  // Two groups (even and odd ranks), each ordered by descending world rank.
  auto group = world->split(me % 2, -me);
  EXPECT_EQ(group->size(), (n + 1 - me % 2) / 2);
  int32_t mine = me, sum = 0;
  group->all_reduce_sum(&mine, &sum, 1, comm::Element::i32);
  int expect = 0;
  for (int r = me % 2; r < n; r += 2) expect += r;
  EXPECT_EQ(sum, expect);
  // Rank 0 of the group holds the largest world rank of its parity.
  std::vector<int32_t> members(static_cast<std::size_t>(group->size()));
  group->all_gather(&mine, members.data(), 1, comm::Element::i32);
  for (std::size_t i = 1; i < members.size(); ++i) EXPECT_GT(members[i - 1], members[i]);
  EXPECT_EQ(group->transport(), "mpi");
}

TEST(MpiComm, CountsBeyondMpisIntAreRefusedByName) {
  auto world = comm::mpi_world();
  float x = 1.0f;
  try {
    world->all_reduce_sum(&x, &x, int64_t{1} << 40, comm::Element::f32);
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input);
    EXPECT_NE(std::string(e.what()).find("all_reduce"), std::string::npos) << e.what();
  }
  world->barrier();
}
