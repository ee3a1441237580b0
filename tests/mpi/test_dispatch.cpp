// The alltoall exchange (kernels/comm/row_exchange.hpp) checked the way expert-parallel libraries
// check theirs, under mpirun with 2 and 4 ranks: token rows encode their source rank and index, so
// every received row is traced back to where it came from; the counts each rank receives equal
// those computed from every rank's top-k ids (all-gathered); dispatch, then identity experts, then
// combine returns x · Σ weights; and repeated runs give identical bytes.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "kernels/comm/communicator.hpp"
#include "kernels/comm/row_exchange.hpp"
#include "kernels/common/random.hpp"

using namespace moeflow;

namespace {

constexpr int kHidden = 24, kTopK = 3, kExpertsPerRank = 2;

// Rank r's token count: uneven, one rank with none.
int64_t tokens_of(int r) { return r == 1 ? 0 : 5 + 7 * r; }

// Rank r's top-k ids of token t: distinct experts of ranks × kExpertsPerRank, from the generator.
std::vector<int32_t> ids_of(int r, int64_t t, int experts) {
  std::vector<int32_t> ids;
  for (uint64_t draw = 0; static_cast<int>(ids.size()) < kTopK; ++draw) {
    const auto e = static_cast<int32_t>(rng::mix64(rng::stream_key(static_cast<uint64_t>(r), 77) + 1000 * static_cast<uint64_t>(t) + draw) %
                                        static_cast<uint64_t>(experts));
    bool seen = false;
    for (int32_t x : ids) seen = seen || x == e;
    if (!seen) ids.push_back(e);
  }
  return ids;
}

float weight_of(int r, int64_t t, int j) {
  return 0.5f * (rng::uniform_pm1(rng::stream_key(static_cast<uint64_t>(r), 78), static_cast<uint64_t>(t * kTopK + j)) + 1.0f);
}

struct RankData {
  std::vector<float> x, w;
  std::vector<int32_t> ids;
};

// Row t of rank r: element 0 = r, element 1 = t, the rest a function of both (never zero).
RankData data_of(int r, int experts) {
  RankData d;
  const int64_t n = tokens_of(r);
  for (int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < kHidden; ++h) d.x.push_back(h == 0 ? static_cast<float>(r) : h == 1 ? static_cast<float>(t) : 1.0f + 0.01f * h + r + 0.1f * t);
    for (int32_t e : ids_of(r, t, experts)) d.ids.push_back(e);
    for (int j = 0; j < kTopK; ++j) d.w.push_back(weight_of(r, t, j));
  }
  return d;
}

struct Exchanged {
  std::vector<float> x, w, out;
  std::vector<int32_t> ids, counts, sources;
  int64_t received = 0;
};

// Dispatch, identity experts (each received row times the weights of the choices this rank owns),
// and combine back.
Exchanged exchange(comm::Communicator& world, const RankData& d) {
  const int ranks = world.size(), me = world.rank();
  int64_t capacity = 0;
  for (int r = 0; r < ranks; ++r) capacity += tokens_of(r);
  const int64_t rows = tokens_of(me);
  Exchanged e;
  e.x.assign(static_cast<std::size_t>(capacity * kHidden), -1.0f);
  e.ids.assign(static_cast<std::size_t>(capacity * kTopK), 7);
  e.w.assign(static_cast<std::size_t>(capacity * kTopK), -1.0f);
  e.counts.assign(static_cast<std::size_t>(2 * ranks), 0);
  e.sources.assign(static_cast<std::size_t>(std::max<int64_t>(1, comm::exchange_sources_ints(ranks, rows, kTopK))), 0);
  const comm::ExpertOwners owners{kExpertsPerRank};
  e.received = comm::dispatch_rows(world, owners, d.x.data(), d.ids.data(), d.w.data(), rows, kHidden, kTopK, capacity,
                                   e.x.data(), e.ids.data(), e.w.data(), e.counts.data(), e.sources.data());
  std::vector<float> y(e.x.size(), 0.0f);
  for (int64_t i = 0; i < e.received; ++i) {
    float scale = 0.0f;
    for (int j = 0; j < kTopK; ++j)
      if (owners.owns(me, e.ids[static_cast<std::size_t>(i * kTopK + j)])) scale += e.w[static_cast<std::size_t>(i * kTopK + j)];
    for (int h = 0; h < kHidden; ++h) y[static_cast<std::size_t>(i * kHidden + h)] = scale * e.x[static_cast<std::size_t>(i * kHidden + h)];
  }
  e.out.assign(static_cast<std::size_t>(std::max<int64_t>(rows, 1) * kHidden), 0.0f);
  std::vector<float> staging(static_cast<std::size_t>(std::max<int64_t>(rows, 1) * ranks * kHidden));
  comm::combine_rows_back(world, y.data(), kHidden, e.counts.data(), e.sources.data(), rows, e.out.data(), staging.data());
  return e;
}

}  // namespace

TEST(AlltoallExchange, RowsArriveFromTheirSourceWithTheirRouting) {
  auto world = comm::mpi_world();
  const int ranks = world->size(), me = world->rank(), experts = ranks * kExpertsPerRank;
  const Exchanged e = exchange(*world, data_of(me, experts));
  const comm::ExpertOwners owners{kExpertsPerRank};
  int last_source = -1;
  int64_t last_token = -1;
  for (int64_t i = 0; i < e.received; ++i) {
    const int source = static_cast<int>(e.x[static_cast<std::size_t>(i * kHidden)]);
    const int64_t t = static_cast<int64_t>(e.x[static_cast<std::size_t>(i * kHidden + 1)]);
    ASSERT_GE(source, 0);
    ASSERT_LT(source, ranks);
    ASSERT_LT(t, tokens_of(source));
    // In (source, token) order, each row once.
    EXPECT_TRUE(source > last_source || (source == last_source && t > last_token)) << "row " << i;
    last_source = source;
    last_token = t;
    const std::vector<int32_t> ids = ids_of(source, t, experts);
    bool mine = false;
    for (int j = 0; j < kTopK; ++j) {
      EXPECT_EQ(e.ids[static_cast<std::size_t>(i * kTopK + j)], ids[static_cast<std::size_t>(j)]);
      EXPECT_EQ(e.w[static_cast<std::size_t>(i * kTopK + j)], weight_of(source, t, j));
      mine = mine || owners.owns(me, ids[static_cast<std::size_t>(j)]);
    }
    EXPECT_TRUE(mine) << "rank " << me << " got row " << t << " of rank " << source << " but owns none of its experts";
  }
  // Past the rows received: routed nowhere.
  for (std::size_t i = static_cast<std::size_t>(e.received * kTopK); i < e.ids.size(); ++i) {
    EXPECT_EQ(e.ids[i], -1);
    EXPECT_EQ(e.w[i], 0.0f);
  }
}

TEST(AlltoallExchange, ReceivedCountsMatchTheAllGatheredRouting) {
  auto world = comm::mpi_world();
  const int ranks = world->size(), me = world->rank(), experts = ranks * kExpertsPerRank;
  const RankData d = data_of(me, experts);
  const Exchanged e = exchange(*world, d);
  // Every rank's ids, gathered: what each source sends here follows from them alone.
  std::vector<int64_t> counts;
  for (int r = 0; r < ranks; ++r) counts.push_back(tokens_of(r) * kTopK);
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  std::vector<int32_t> all_ids(static_cast<std::size_t>(std::max<int64_t>(total, 1)));
  world->all_gather_v(d.ids.data(), all_ids.data(), counts.data(), comm::Element::i32);
  const comm::ExpertOwners owners{kExpertsPerRank};
  int64_t at = 0, expected_total = 0;
  for (int r = 0; r < ranks; ++r) {
    int64_t expected = 0;
    for (int64_t t = 0; t < tokens_of(r); ++t) {
      bool mine = false;
      for (int j = 0; j < kTopK; ++j) mine = mine || owners.owns(me, all_ids[static_cast<std::size_t>(at + t * kTopK + j)]);
      expected += mine ? 1 : 0;
    }
    at += tokens_of(r) * kTopK;
    EXPECT_EQ(e.counts[static_cast<std::size_t>(ranks + r)], expected) << "rows from rank " << r;
    expected_total += expected;
  }
  EXPECT_EQ(e.received, expected_total);
}

TEST(AlltoallExchange, IdentityExpertsReturnXTimesTheSumOfWeightsAndRerunsAreIdentical) {
  auto world = comm::mpi_world();
  const int me = world->rank(), experts = world->size() * kExpertsPerRank;
  const RankData d = data_of(me, experts);
  const Exchanged first = exchange(*world, d);
  for (int64_t t = 0; t < tokens_of(me); ++t) {
    float sum = 0.0f;
    for (int j = 0; j < kTopK; ++j) sum += d.w[static_cast<std::size_t>(t * kTopK + j)];
    for (int h = 0; h < kHidden; ++h) {
      const float expect = sum * d.x[static_cast<std::size_t>(t * kHidden + h)];
      EXPECT_NEAR(first.out[static_cast<std::size_t>(t * kHidden + h)], expect, 1e-5f * std::max(1.0f, std::abs(expect)))
          << "token " << t << " h " << h;
    }
  }
  const Exchanged again = exchange(*world, d);
  EXPECT_EQ(0, std::memcmp(first.out.data(), again.out.data(), sizeof(float) * first.out.size()));
  EXPECT_EQ(first.counts, again.counts);
  EXPECT_EQ(first.sources, again.sources);
}
