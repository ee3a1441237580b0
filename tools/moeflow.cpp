// moeflow: build, plan, run, check, time and draw MoE layers (DESIGN.md, "The command line").
// Exit status: 0 ok; 1 a check failed; 2 bad input; 3 resources.
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <new>
#include <string>

#include "graph/error.hpp"
#include "kernels/comm/communicator.hpp"
#include "tools/commands.hpp"

namespace {

char lost_peer_message[160];

// mpirun terminates the surviving ranks when one dies or fails: say why, with status 3, at once.
void on_terminate(int) {
  const ssize_t written = write(STDERR_FILENO, lost_peer_message, std::strlen(lost_peer_message));
  (void)written;
  _exit(3);
}

// One write per message, so lines of several ranks sharing a terminal do not interleave.
void report(const std::string& message) {
  const std::string line = "moeflow: error: " + message + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

// Under mpirun: MPI up, and the rank named in every message.
std::string start_ranks(int* argc, char*** argv) {
  if (!moeflow::comm::launched_by_mpirun() || !moeflow::comm::have_mpi()) return "";
  moeflow::comm::mpi_start(argc, argv);
  const int rank = moeflow::comm::mpi_world_rank(), size = moeflow::comm::mpi_world_size();
  const std::string who = "rank " + std::to_string(rank) + " of " + std::to_string(size);
  std::snprintf(lost_peer_message, sizeof lost_peer_message,
                "moeflow: error: %s stopped: a peer rank was lost or failed (mpirun ended the job)\n", who.c_str());
  std::signal(SIGTERM, on_terminate);
  return who + ": ";
}

// Every error of a multi-rank run that only this rank raised takes the others down: they may be
// waiting in a collective this rank will never enter.
int finish(int status, bool every_rank) {
  if (moeflow::comm::mpi_started()) {
    if (status != 0 && !every_rank && moeflow::comm::mpi_world_size() > 1) moeflow::comm::mpi_abort(status);
    moeflow::comm::mpi_stop();
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  std::string who;
  try {
    who = start_ranks(&argc, &argv);
  } catch (const moeflow::Error& e) {
    report(e.what());
    return e.exit_status();
  }
  CLI::App app{"moeflow: Mixture-of-Experts layers as dataflow graphs"};
  app.require_subcommand(1);
  const std::map<std::string, moeflow::cli::Command> commands{
      {"run", moeflow::cli::add_run_command(app)},     {"dot", moeflow::cli::add_dot_command(app)},
      {"plan", moeflow::cli::add_plan_command(app)},   {"bench", moeflow::cli::add_bench_command(app)},
      {"trace", moeflow::cli::add_trace_command(app)}, {"tune", moeflow::cli::add_tune_command(app)},
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return finish(app.exit(e), true);
  } catch (const CLI::CallForAllHelp& e) {
    return finish(app.exit(e), true);
  } catch (const CLI::ParseError& e) {
    report(who + e.what() + " (see --help)");  // one line, like every other error
    return finish(2, true);  // the same flags on every rank: each refuses them alike
  }
  try {
    return finish(commands.at(app.get_subcommands().front()->get_name())(), true);
  } catch (const moeflow::Error& e) {
    report(who + e.what());
    return finish(e.exit_status(), e.on_every_rank());
  } catch (const std::bad_alloc&) {
    report(who + "out of host memory");
    return finish(3, false);
  } catch (const std::exception& e) {
    report(who + e.what());
    return finish(2, false);
  }
}
