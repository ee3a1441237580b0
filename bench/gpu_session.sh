#!/usr/bin/env bash
# One call on the GPU machine (see the device README): unpack the carried .deb files, build there,
# run the gpu tests (plain, memcheck, racecheck), the CLI checks of every preset, the CUDA-graph
# host cost (mode `tests`), or the benchmark sweep (mode `bench`). Everything lands in $OUT.
# Usage: bash bench/gpu_session.sh tests|full|profile|metrics|racecheck|bench|overlap|chunks|decode|timeline|layers|probe|ranks|cutlass|anyt|resources|fused|fusedprof|validate|shared|tune|views|tiles|swiglu|single|sweep [models] [experts kernels] [tokens] [scopes]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /opt/deps && for f in .deps/*.deb; do dpkg -x "$f" /opt/deps; done
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export PKG_CONFIG_SYSROOT_DIR=/opt/deps PKG_CONFIG_PATH=/opt/deps/usr/lib/x86_64-linux-gnu/pkgconfig
b=/tmp/b
{ cmake -S . -B $b -G Ninja -DCMAKE_PREFIX_PATH=/opt/deps/usr -DCMAKE_CUDA_ARCHITECTURES=90a -DMOEFLOW_CUDA=ON \
  && ninja -C $b moeflow moeflow_gpu_tests; } > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
mode=${1:-tests}
# Every gpu test, then the tests matching $1 (if given) under memcheck, racecheck and synccheck, their
# logs in $OUT/$2_<tool>.log.
tests_and_sanitizers() {
  echo "== gpu tests"; timeout 240 $b/moeflow_gpu_tests --gtest_brief=1 > "$OUT/gpu_tests.log" 2>&1; echo "rc=$?"
  grep -E "FAILED|Failure|tests ran|PASSED" "$OUT/gpu_tests.log" | head -12
  [[ -z ${1:-} ]] && return
  for tool in memcheck racecheck synccheck; do
    timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 $b/moeflow_gpu_tests --gtest_brief=1 \
      --gtest_filter="$1" > "$OUT/$2_$tool.log" 2>&1; echo "$tool rc=$?: $(tail -n 2 "$OUT/$2_$tool.log" | tr '\n' ' ')"
  done
}
# Where the experts path's time goes, kernel by kernel, where $PROFILE is set ("model,T;model,T", or
# "model,T,kernel" to force the experts kernel): one eager run each under Nsight Compute (duration
# only, clocks not locked), its last ${PROFILE_LAST:-10} kernels, into $OUT/kernel_profile.txt.
kernel_profile() {
  [[ -z ${PROFILE:-} ]] && return
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  for point in ${PROFILE//;/ }; do
    IFS=, read -r model tokens kernel <<< "$point"
    echo "== kernels of ${point} (us, name)" | tee -a "$OUT/kernel_profile.txt"
    timeout 150 $ncu --clock-control none --metrics gpu__time_duration.sum --csv $b/moeflow run --backend cuda \
      --model $model --scope experts --tokens $tokens --runs 1 --warmup 0 ${kernel:+--kernel experts=$kernel} \
      > /tmp/ncu.csv 2>/dev/null
    grep '^"' /tmp/ncu.csv | python3 -c 'import csv,sys
rows=[r for r in csv.DictReader(sys.stdin) if r.get("Metric Name")=="gpu__time_duration.sum"]
for r in rows[-int(sys.argv[1]):]:
  v=float(r["Metric Value"].replace(",","")); u=r["Metric Unit"]
  print("%10.1f" % (v/1000 if u in ("ns","nsecond") else v*1000 if u in ("ms","msecond") else v), r["Kernel Name"][:100])' ${PROFILE_LAST:-10} \
      | tee -a "$OUT/kernel_profile.txt"
  done
}
# Whole layers as CUDA-graph replays (concurrent plan, $RUNS runs): the median and the host's cost of
# one replay for every model in $1 (space-separated), T in $2 and flag set in the rest ('' = as
# planned), into $OUT/layers.txt.
layer_timings() {
  local models=$1 tokens=$2; shift 2
  for m in $models; do for t in $tokens; do for flags in "$@"; do
    $b/moeflow run --backend cuda --model $m --tokens $t --plan concurrent --cuda-graph --runs ${RUNS:-300} $flags --json 2>&1 \
      | python3 -c "import json,sys; r=json.load(sys.stdin); print('%-18s T=%-4s %-28s median %8.1f us  replay host cost %5.1f us' % (sys.argv[1], sys.argv[2], sys.argv[3] or 'as planned', r['median_us'], r['graph_launch_us']))" $m $t "$flags"
  done; done; done | tee "$OUT/layers.txt"
}
if [[ $mode == profile ]]; then
  # Only the kernel-by-kernel profile of the points in $PROFILE (no tests).
  kernel_profile
  exit 0
fi
if [[ $mode == metrics ]]; then
  # DRAM and L2 metrics of the CUTLASS GEMMs under Nsight Compute, one eager run per point of
  # $POINTS ("model,T,experts-kernel ..."), one line per GEMM launch, into $OUT/metrics.txt.
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  for point in ${POINTS:?POINTS=\"model,T,kernel ...\"}; do
    IFS=, read -r model tokens kernel <<< "$point"
    echo "== $point"
    timeout 100 $ncu --clock-control none --kernel-name regex:device_kernel --csv --metrics \
      gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct \
      $b/moeflow run --backend cuda --model $model --scope experts --tokens $tokens --runs 1 --warmup 0 \
      --kernel experts=$kernel 2>/dev/null | grep '^"' | python3 -c 'import csv,sys
by = {}
for r in csv.DictReader(sys.stdin): by.setdefault(int(r["ID"]), {})[r["Metric Name"]] = r["Metric Value"] + r["Metric Unit"]
for i in sorted(by): print(i, "  ".join(n + "=" + v for n, v in sorted(by[i].items())))'
  done | tee "$OUT/metrics.txt"
  exit 0
fi
if [[ $mode == ranks ]]; then
  # Multi-rank on this host's GPUs (NCCL, ranks by mpirun): the GPU lowering tests over 2 and 4
  # ranks, run --check of the full presets, and the bench rows of the multi-rank issue.
  export NCCL_NVLS_ENABLE=0
  ninja -C $b moeflow_mpi_tests >> "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  grep -E "MOEFLOW_NCCL|MOEFLOW_MPI" $b/CMakeCache.txt | head -3
  ngpu=$(nvidia-smi -L | wc -l)
  MPI="timeout ${3:-200} mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH -x PATH"
  part=${4:-all}  # tests | bench | all | quick (the gpu lowering tests, then the alltoall bench at $TOKENS, default 4096, tokens per rank)
  if [[ $part == quick ]]; then
    n=$ngpu
    $MPI -np $n $b/moeflow_mpi_tests --gtest_filter='Layouts/LoweredGpu*' > "$OUT/ranks_tests_$n.log" 2>&1; echo "tests rc=$?"
    grep -E "PASSED|FAILED|Failure|rel_norm" "$OUT/ranks_tests_$n.log" | head -10
    $MPI -np $n $b/moeflow bench --backend cuda --models ${2:-deepseek-v3,qwen3-30b-a3b} --tokens ${TOKENS:-4096} --dp $n --ep \
      --dispatches alltoall --chunks 1,2 --plans serial,concurrent --runs ${RUNS:-30} --json "$OUT/ranks_quick_$n.jsonl" > "$OUT/ranks_quick_$n.log" 2>&1
    echo "bench rc=$?"; tail -12 "$OUT/ranks_quick_$n.log"
    exit 0
  fi
  for n in 2 4; do
    [[ $n -gt $ngpu || $part == bench ]] && continue
    echo "== $n ranks: gpu lowering tests"
    $MPI -np $n $b/moeflow_mpi_tests --gtest_filter='Layouts/LoweredGpu*' > "$OUT/ranks_tests_$n.log" 2>&1; echo "rc=$?"
    grep -E "PASSED|FAILED|Failure|rel_norm|error" "$OUT/ranks_tests_$n.log" | head -20
    echo "== $n ranks: run --check"
    for m in deepseek-v3 qwen3-30b-a3b; do for k in alltoall topk-allgather allgather; do
      $MPI -np $n $b/moeflow run --backend cuda --model $m --dp $n --ep --dispatch $k --tokens 64 --runs 5 --check 2>&1 \
        | grep -E "PASS|FAIL|error" | head -4 | sed "s/^/$m $k: /"
    done; done
  done
  for n in ${5:-2 4}; do
    [[ $n -gt $ngpu || $part == tests ]] && continue
    echo "== $n ranks: bench"
    $MPI -np $n $b/moeflow bench --backend cuda --models ${2:-deepseek-v3,qwen3-30b-a3b} --tokens 128,1024,4096 --dp $n --ep \
      --chunks 1,2 --plans serial,concurrent --runs 10 --json "$OUT/ranks_bench_$n.jsonl" > "$OUT/ranks_bench_$n.log" 2>&1
    echo "rc=$?"; tail -40 "$OUT/ranks_bench_$n.log"
  done
  exit 0
fi
if [[ $mode == bench ]]; then
  models=${2:-qwen1.5-moe-a2.7b,deepseek-v3,mixtral-8x7b,qwen3-30b-a3b}
  echo "== bench $models"
  timeout 560 $b/moeflow bench --backend cuda --models "$models" --tokens ${4:-1,8,32,128,512,2048,8192} \
    --plans serial,concurrent,graph --experts-kernels ${3:-cuda.decode_gemv,cuda.cublas_grouped_batched,cuda.cublas_per_expert_loop,cuda.cublas_padded_strided,cuda.cublas_rows_batched,cuda.cublas_padded_to_max} \
    --scope ${5:-both} --json "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1; echo "rc=$?"; grep -v "^skipped" "$OUT/bench.log" | tail -60
  exit 0
fi
if [[ $mode == full ]]; then
  # Every gpu test, memcheck over the whole suite, and run --check of every preset and plan.
  echo "== gpu tests"; timeout 240 $b/moeflow_gpu_tests --gtest_brief=1 > "$OUT/gpu_tests.log" 2>&1; echo "rc=$?"; tail -2 "$OUT/gpu_tests.log"
  grep -E "FAILED|Failure" "$OUT/gpu_tests.log" | head -20
  echo "== memcheck, whole gpu suite"
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 $b/moeflow_gpu_tests --gtest_brief=1 > "$OUT/memcheck.log" 2>&1
  echo "rc=$?"; tail -n 3 "$OUT/memcheck.log"
  echo "== run --check per preset"
  for m in qwen1.5-moe-a2.7b mixtral-8x7b qwen3-30b-a3b deepseek-v3; do
    for p in serial concurrent; do
      $b/moeflow run --backend cuda --model $m --tokens 64 --plan $p --check 2>&1 | grep -E "moeflow run|^  $m|check|error"
    done
  done > "$OUT/run_checks.log"; grep -E "check|error" "$OUT/run_checks.log" | cut -c1-150
  exit 0
fi
if [[ $mode == racecheck ]]; then
  echo "== racecheck, whole gpu suite"
  # ${3}: a gtest filter, e.g. -*rows_batched* (cuBLAS's batched GEMM kernel, whose hazards are its own).
  timeout ${2:-400} compute-sanitizer --tool racecheck --error-exitcode 9 $b/moeflow_gpu_tests \
    --gtest_filter="${3:-*}" > "$OUT/racecheck.log" 2>&1
  echo "rc=$?"; tail -n 3 "$OUT/racecheck.log"; echo "races reported: $(grep -c 'Race reported' "$OUT/racecheck.log")"
  echo "tests finished: $(grep -c '^\[       OK \]' "$OUT/racecheck.log")"; grep -B1 'Race reported' "$OUT/racecheck.log" | grep RUN | head
  [[ ${4:-} == chunks ]] && timeout 150 $b/moeflow bench --backend cuda --models mixtral-8x7b,qwen3-30b-a3b,qwen1.5-moe-a2.7b,deepseek-v3 \
    --tokens 2048,8192 --chunks 1,2,4 --plans serial,concurrent --scope layer --json "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1
  exit 0
fi
if [[ $mode == timeline ]]; then
  # Node-by-node timelines of CUDA-graph replays (GPU clock stamps) of whole layers at small T.
  [[ -z ${SKIP_TESTS:-} ]] && echo "== gpu tests" && timeout 240 $b/moeflow_gpu_tests --gtest_brief=1 > "$OUT/gpu_tests.log" 2>&1; echo "rc=$?"; tail -2 "$OUT/gpu_tests.log"
  for m in ${2:-qwen1.5-moe-a2.7b deepseek-v3}; do for t in ${3:-1 8}; do for sc in layer routed shared; do
    $b/moeflow run --backend cuda --model $m --scope $sc --tokens $t --plan concurrent --cuda-graph --trace "$OUT/tl_${m}_${t}_$sc.json" > /dev/null 2>&1
    python3 -c "
import json,sys
ev=[e for e in json.load(open(sys.argv[1]))['traceEvents'] if e.get('ph')=='X']
end=max(e['ts']+e['dur'] for e in ev)
print(sys.argv[2], 'span %.1f us' % (end-min(e['ts'] for e in ev)))
for e in sorted(ev,key=lambda e:e['ts']): print('   tid %s %-22s %7.1f +%6.1f' % (e['tid'], e['name'], e['ts'], e['dur']))
" "$OUT/tl_${m}_${t}_$sc.json" "$m T=$t $sc"
  done; done; done | tee "$OUT/timelines.txt"
  exit 0
fi
if [[ $mode == decode ]]; then
  # The gpu tests, then our decode kernel against cuBLAS's batched and grouped GEMMs (experts scope),
  # and the whole layer with the shared expert at small T.
  echo "== gpu tests"; timeout 240 $b/moeflow_gpu_tests --gtest_brief=1 > "$OUT/gpu_tests.log" 2>&1; echo "rc=$?"; tail -2 "$OUT/gpu_tests.log"
  grep -E "FAILED|Failure|decode" "$OUT/gpu_tests.log" | head -20
  echo "== decode bench"
  timeout 200 $b/moeflow bench --backend cuda --models mixtral-8x7b,qwen3-30b-a3b,qwen1.5-moe-a2.7b,deepseek-v3 --tokens 1,8,32 \
    --plans serial,graph --experts-kernels cuda.decode_gemv,cuda.cublas_rows_batched,cuda.cublas_grouped_batched \
    --scope experts --json "$OUT/decode.jsonl" > "$OUT/decode.log" 2>&1; echo "rc=$?"; grep -v "^skipped" "$OUT/decode.log" | tail -40
  timeout 200 $b/moeflow bench --backend cuda --models qwen1.5-moe-a2.7b,deepseek-v3 --tokens 1,8,32 \
    --plans serial,concurrent,graph --experts-kernels cuda.decode_gemv --scope layer,routed,shared \
    --json "$OUT/overlap.jsonl" > "$OUT/overlap.log" 2>&1; echo "rc=$?"
  exit 0
fi
if [[ $mode == sweep ]]; then
  # Every gpu test, then the experts path as planned over every preset and T (concurrent plan, and
  # in a CUDA graph), then time(chunked) / time(unchunked) of the layer at T = 2048, 8192.
  tests_and_sanitizers
  models=${2:-mixtral-8x7b,qwen3-30b-a3b,qwen1.5-moe-a2.7b,deepseek-v3}
  echo "== experts path, as planned"
  timeout 260 $b/moeflow bench --backend cuda --models $models --tokens ${TOKENS:-1,8,32,128,512,2048,8192} \
    --plans concurrent,graph --scope experts --runs ${RUNS:-30} --json "$OUT/sweep_experts.jsonl" > "$OUT/sweep_experts.log" 2>&1
  echo "rc=$?"; grep -v "^skipped" "$OUT/sweep_experts.log" | tail -58
  # Issues 7 and 8's figures: the best plan per point, their geometric mean and the worst point.
  [[ -s $OUT/sweep_experts.jsonl ]] && python3 - "$OUT/sweep_experts.jsonl" <<'PY'
import json, math, sys
best = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["preset"], r["T"])
    best[key] = min(best.get(key, math.inf), r["ratio_floor"])
if best:
    worst = max(best, key=best.get)
    print("best plan per point: %d points, geomean %.3f, max %.2f (%s T=%d)" % (
        len(best), math.exp(sum(map(math.log, best.values())) / len(best)), best[worst], *worst))
PY
  echo "== layer, chunks 1,2,4"
  timeout ${CHUNKS_S:-150} $b/moeflow bench --backend cuda --models $models --tokens 2048,8192 --chunks 1,2,4 \
    --plans concurrent,graph --scope layer --runs 10 --json "$OUT/sweep_chunks.jsonl" > "$OUT/sweep_chunks.log" 2>&1
  echo "rc=$?"; grep -v "^skipped" "$OUT/sweep_chunks.log" | tail -50
  exit 0
fi
if [[ $mode == single ]]; then
  # The one-token kernels (w2 in place, in quads; transposed from a packed copy; $KERNELS to choose):
  # every gpu test, their tests under the three sanitizers, resources, then T=1 side by side (experts
  # path of $MODELS and, unless LAYER=no, the layer of $LAYER_MODELS in CUDA graphs, its kernels
  # $LAYER_KERNELS, scopes $LAYER_SCOPES, $LAYER_PASSES passes), then where the experts path's time
  # goes at large T (BREAKDOWN= skips it).
  tests_and_sanitizers "${SAN:-CudaFusedSingleToken.*}" single
  kernel_profile
  obj=$(find $b -name fused_single_token.cu.o | head -1)
  cuobjdump -res-usage "$obj" 2>/dev/null | awk '/Function/ { name = $2 } /REG:/ { print $1, $2, $3, $4, name }' \
    | cu++filt | cut -c1-160 | tee "$OUT/single_resources.txt"
  echo "== experts path, T=1, CUDA graph"
  timeout 150 $b/moeflow bench --backend cuda --models ${MODELS:-qwen1.5-moe-a2.7b,qwen3-30b-a3b,deepseek-v3} --tokens 1 --plans graph \
    --experts-kernels ${KERNELS:-auto,cuda.fused_single_token,cuda.fused_single_token_w2t} --scope experts --runs ${RUNS:-300} \
    --passes 3 --json "$OUT/single_experts.jsonl" > "$OUT/single_experts.log" 2>&1; echo "rc=$?"; grep -v "^skipped" "$OUT/single_experts.log" | tail -12
  [[ ${LAYER:-yes} == no ]] && exit 0
  echo "== ${LAYER_MODELS:-qwen3-30b-a3b} layer, T=1"
  timeout ${LAYER_S:-60} $b/moeflow bench --backend cuda --models ${LAYER_MODELS:-qwen3-30b-a3b} --tokens 1 --plans concurrent,graph \
    --experts-kernels ${LAYER_KERNELS:-auto,cuda.fused_single_token} --scope ${LAYER_SCOPES:-layer} --runs ${RUNS:-300} \
    --passes ${LAYER_PASSES:-1} --json "$OUT/single_layer.jsonl" > "$OUT/single_layer.log" 2>&1; echo "rc=$?"
  grep -v "^skipped" "$OUT/single_layer.log" | tail -${LAYER_TAIL:-6}
  echo "== where the experts path's time goes (eager concurrent runs with events around each node)"
  for point in ${BREAKDOWN-qwen3-30b-a3b,2048 qwen3-30b-a3b,8192 qwen1.5-moe-a2.7b,2048 qwen1.5-moe-a2.7b,8192 deepseek-v3,2048 deepseek-v3,8192}; do
    timeout 60 $b/moeflow run --backend cuda --model ${point%,*} --scope experts --tokens ${point#*,} --plan concurrent \
      --runs 20 --warmup 5 --trace /tmp/trace.json > /dev/null 2>&1
    $b/moeflow trace /tmp/trace.json --summary 2>&1 | tee -a "$OUT/single_breakdown.txt" | grep -v "^  lane"
  done
  exit 0
fi
if [[ $mode == swiglu ]]; then
  # SwiGLU in GEMM 1's epilogue (w13 packed once): every gpu test, the kernel's small tests under the
  # three sanitizers, the compiler's resource report and HGMMA count of the CUTLASS object, then the
  # experts path in a CUDA graph with each 256-column configuration fused and unfused, side by side.
  tests_and_sanitizers "${SAN:-CublasExperts.ZeroTokenExperts:CublasExperts.MoreRowsThanATile*:CublasExperts.Packed*}" swiglu
  obj=$(find $b -name cutlass_grouped.cu.o | head -1)
  cuobjdump -res-usage "$obj" 2>/dev/null | awk '/Function/ { name = $2 } /REG:/ { print $1, $2, $3, $4, name }' \
    | cu++filt | cut -c1-400 > "$OUT/swiglu_resources.txt"
  cuobjdump -sass "$obj" | awk '/Function :/ { f = $3 } /HGMMA/ { n[f]++ } END { for (k in n) print n[k], k }' \
    | cu++filt | cut -c1-120 >> "$OUT/swiglu_resources.txt"
  grep -E "REG|^[0-9]+ " "$OUT/swiglu_resources.txt" | sed -E 's/cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int>>, cutlass::gemm::collective::CollectiveMma<cutlass::gemm:://' | cut -c1-200 | head -20
  kernel_profile
  kernels=${KERNELS:-auto,cuda.cutlass_swiglu_narrow,cuda.cutlass_grouped_narrow,cuda.cutlass_swiglu_wide_single,cuda.cutlass_grouped_wide_single}
  echo "== experts path, CUDA graph"
  timeout ${BENCH_S:-300} $b/moeflow bench --backend cuda --models ${2:-qwen3-30b-a3b,qwen1.5-moe-a2.7b,deepseek-v3,mixtral-8x7b} \
    --tokens ${TOKENS:-512,2048,8192} --plans graph --experts-kernels $kernels --scope experts --runs ${RUNS:-30} \
    --passes ${PASSES:-1} --json "$OUT/swiglu_experts.jsonl" > "$OUT/swiglu_experts.log" 2>&1; echo "rc=$?"; grep -v "^skipped" "$OUT/swiglu_experts.log" | tail -70
  exit 0
fi
if [[ $mode == tiles ]]; then
  # The CUTLASS tile configurations side by side: every gpu test (the kernels matching $SAN under
  # the sanitizers), the experts path at large T for every preset, then mixtral-8x7b at T=8192 in
  # 1, 2 and 4 chunks (the layer; --passes alternates the rows; CHUNKS=no skips it).
  tests_and_sanitizers "${SAN:-*narrow*}" tiles
  kernels=${KERNELS:-auto,cuda.cutlass_grouped,cuda.cutlass_grouped_narrow,cuda.cutlass_grouped_wide}
  echo "== experts path, CUDA graph"
  timeout 240 $b/moeflow bench --backend cuda --models ${2:-mixtral-8x7b,qwen3-30b-a3b,qwen1.5-moe-a2.7b,deepseek-v3} \
    --tokens ${TOKENS:-512,2048,8192} --plans graph --experts-kernels $kernels --scope experts --runs ${RUNS:-30} \
    --json "$OUT/tiles_experts.jsonl" > "$OUT/tiles_experts.log" 2>&1; echo "rc=$?"; grep -v "^skipped" "$OUT/tiles_experts.log" | tail -50
  [[ ${CHUNKS:-yes} == no ]] && exit 0
  echo "== mixtral-8x7b T=8192 layer, chunks 1,2,4"
  timeout 200 $b/moeflow bench --backend cuda --models mixtral-8x7b --tokens 8192 --chunks 1,2,4 --plans concurrent,graph \
    --experts-kernels ${CHUNK_KERNELS:-auto,cuda.cublas_per_expert_loop,cuda.cutlass_grouped,cuda.cutlass_grouped_narrow} \
    --scope layer --runs 20 --passes 2 --json "$OUT/tiles_chunks.jsonl" > "$OUT/tiles_chunks.log" 2>&1
  echo "rc=$?"; sed -n '/over passes/,$p' "$OUT/tiles_chunks.log" | sed 's/experts_kernel_asked=[^ ]* //' | tail -30
  exit 0
fi
if [[ $mode == views ]]; then
  # Chunks whose rows are views of the whole value: every gpu test and the chunked ones under the
  # sanitizers, then mixtral-8x7b at T=8192 chunked 1/2/4 over the plans and experts kernels
  # ($KERNELS; --passes 3 alternates the rows), then one traced run per chunk count and kernel.
  tests_and_sanitizers "${SAN:-Families/CudaChunkedLayer.*}" chunks
  echo "== mixtral-8x7b T=8192, chunks 1,2,4"
  timeout ${BENCH_S:-300} $b/moeflow bench --backend cuda --models mixtral-8x7b --tokens 8192 --chunks 1,2,4 \
    --plans serial,concurrent,graph --experts-kernels ${KERNELS:-auto,cuda.cublas_per_expert_loop,cuda.cutlass_grouped_wide} \
    --scope layer --runs ${RUNS:-30} --passes ${PASSES:-3} --json "$OUT/mixtral_chunks.jsonl" > "$OUT/mixtral_chunks.log" 2>&1
  echo "rc=$?"; sed -n '/over passes/,$p' "$OUT/mixtral_chunks.log" | grep -v "^skipped" | tail -40
  for c in 1 2 4; do for k in ${TRACE_KERNELS:-cuda.cublas_per_expert_loop cuda.cutlass_grouped_wide}; do
    $b/moeflow run --backend cuda --model mixtral-8x7b --tokens 8192 --plan concurrent --chunks $c --runs 8 --warmup 2 \
      --kernel experts=$k --trace /tmp/trace_$c.json --json 2>&1 | python3 -c "import json,sys; print('chunks=$c $k median %.1f us' % json.load(sys.stdin)['median_us'])"
    $b/moeflow trace /tmp/trace_$c.json --summary 2>&1 | head -16
  done; done
  exit 0
fi
if [[ $mode == chunks ]]; then
  # gpu tests (plain), then time(chunked) / time(unchunked) per preset at large T.
  echo "== gpu tests"; timeout 240 $b/moeflow_gpu_tests --gtest_brief=1 > "$OUT/gpu_tests.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/gpu_tests.log"
  grep -E "FAILED|Failure" "$OUT/gpu_tests.log" | head -20
  echo "== chunk bench"
  timeout 300 $b/moeflow bench --backend cuda --models ${2:-mixtral-8x7b,qwen3-30b-a3b,qwen1.5-moe-a2.7b,deepseek-v3} \
    --tokens ${4:-2048,8192} --chunks 1,2,4 --plans ${5:-serial,concurrent,graph} --scope layer --json "$OUT/bench.jsonl" \
    > "$OUT/bench.log" 2>&1; echo "rc=$?"; grep -v "^skipped" "$OUT/bench.log" | tail -50
  exit 0
fi
if [[ $mode == overlap ]]; then
  # gpu tests first (plain), then shared-expert overlap: layer vs its two branches, every plan.
  echo "== gpu tests"; timeout 200 $b/moeflow_gpu_tests --gtest_brief=1 > "$OUT/gpu_tests.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/gpu_tests.log"
  echo "== overlap bench"
  timeout 330 $b/moeflow bench --backend cuda --models ${2:-qwen1.5-moe-a2.7b,deepseek-v3} --tokens ${4:-1,8,32,128,256} \
    --plans serial,concurrent,graph --experts-kernels ${3:-cuda.cublas_rows_batched,cuda.cublas_grouped_batched,cuda.cublas_padded_strided} \
    --scope layer,routed,shared --json "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1; echo "rc=$?"; tail -5 "$OUT/bench.log"
  nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/*/bin/nsys 2>/dev/null | head -1)
  echo "nsys: ${nsys:-none}"
  if [[ -n $nsys ]]; then
    timeout 90 $nsys profile -o /tmp/ov --cuda-graph-trace=node -t cuda $b/moeflow bench --backend cuda --models qwen1.5-moe-a2.7b \
      --tokens 1 --plans graph --experts-kernels cuda.cublas_rows_batched --scope layer > /dev/null 2>&1
    timeout 60 $nsys stats -q --report cuda_gpu_trace --format csv -o /tmp/ovs /tmp/ov.nsys-rep > /dev/null 2>&1
    tail -n 400 /tmp/ovs*.csv > "$OUT/nsys_trace.csv" 2>/dev/null; wc -l "$OUT/nsys_trace.csv"
  fi
  exit 0
fi
if [[ $mode == cutlass ]]; then
  # CUTLASS grouped GEMM (issue 7): resource report and SASS, its tests (plain, memcheck), run --check
  # per preset eager and as a CUDA graph; then (part bench) the experts path next to cuBLAS and decode.
  part=${2:-tests}
  if [[ $part == tests ]]; then
    obj=$(find $b -name cutlass_grouped.cu.o | head -1)
    echo "== resource usage"; cuobjdump -res-usage "$obj" 2>&1 | grep -B1 -A1 "REG" | cut -c1-220 | tee "$OUT/cutlass_resources.txt"
    echo "HGMMA in SASS: $(cuobjdump -sass "$obj" | grep -c HGMMA)" | tee -a "$OUT/cutlass_resources.txt"
    f='CublasExperts*:Families/CudaLayer.*cutlass*:CudaLayerGraph*'
    echo "== tests"; timeout 240 $b/moeflow_gpu_tests --gtest_filter="$f" > "$OUT/cutlass_tests.log" 2>&1; echo "rc=$?"
    grep -E "FAILED|Failure|PASSED|cutlass" "$OUT/cutlass_tests.log" | head -30
    echo "== memcheck"; timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 $b/moeflow_gpu_tests --gtest_brief=1 \
      --gtest_filter='CublasExperts*:Families/CudaLayer.*qwen*cutlass*' > "$OUT/cutlass_memcheck.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/cutlass_memcheck.log"
    echo "== run --check"
    for m in qwen1.5-moe-a2.7b mixtral-8x7b qwen3-30b-a3b deepseek-v3; do
      $b/moeflow run --backend cuda --model $m --tokens 512 --kernel experts=cuda.cutlass_grouped --check 2>&1 | grep -E "check|error"
      $b/moeflow run --backend cuda --model $m --tokens 512 --kernel experts=cuda.cutlass_grouped --cuda-graph --check 2>&1 | grep -E "check|error"
    done
    $b/moeflow run --backend cuda --model qwen3-30b-a3b --tokens 4096 --kernel experts=cuda.cutlass_grouped_wide --cuda-graph \
      --check 2>&1 | grep -E "check|error"
  else
    timeout 540 $b/moeflow bench --backend cuda --models ${3:-qwen1.5-moe-a2.7b,deepseek-v3,mixtral-8x7b,qwen3-30b-a3b} \
      --tokens ${4:-8,32,128,512,2048,8192} --plans serial,graph --scope experts \
      --experts-kernels ${5:-cuda.cutlass_grouped,cuda.cutlass_grouped_wide,cuda.cublas_grouped_batched,cuda.cublas_padded_to_max,cuda.decode_gemv} --json "$OUT/cutlass_bench.jsonl" \
      > "$OUT/cutlass_bench.log" 2>&1; echo "rc=$?"; grep -v "^skipped" "$OUT/cutlass_bench.log" | tail -50
  fi
  exit 0
fi
if [[ $mode == layers ]]; then
  # Whole layers (layer_timings) once as planned and once with $AB (default --no-reuse-memory: every
  # value its own bytes, no kernel in place; or e.g. AB="--kernel gate=cuda.router_topk"). Every gpu
  # test first, and the three sanitizers on the tests matching $SAN where it is set.
  tests_and_sanitizers "${SAN:-}" san
  layer_timings "${2:-qwen3-30b-a3b mixtral-8x7b qwen1.5-moe-a2.7b deepseek-v3}" "${3:-1 8}" "" "${AB:---no-reuse-memory}"
  exit 0
fi
if [[ $mode == resources ]]; then
  # The compiler's resource report of every kernel we compile (registers, stack, local memory =
  # spills, shared memory), names demangled, one line each.
  for o in $(find $b -path "*kernels/cuda/*.cu.o" | sort); do
    cuobjdump -res-usage "$o" 2>/dev/null | awk -v f="$(basename "$o" .cu.o)" '
      /Function/ { name = $2; sub(":$", "", name) }
      /REG:/ { print f, name, $1, $2, $3, $4 }' | while read -r file name reg stack shared local; do
        echo "$file $(echo "$name" | cu++filt | sed -E 's/\(.*//' | cut -c1-90) $reg $stack $shared $local"
      done
  done | tee "$OUT/resources.txt"
  exit 0
fi
if [[ $mode == validate ]]; then
  # Before a commit that touches the kernels: every gpu test, the fused kernel under the three
  # sanitizers, the resource report of the decode kernels, and the experts path at small T.
  tests_and_sanitizers 'CudaFusedDecode.*:CudaFusedSingleToken.*' fused
  for o in $(find $b -name "fused_decode.cu.o" -o -name "fused_single_token.cu.o" -o -name "decode_experts.cu.o"); do
    cuobjdump -res-usage "$o" 2>/dev/null | awk '/Function/ { name = $2 } /REG:/ { print name, $1, $2, $4 }' | cu++filt | cut -c1-160
  done | tee "$OUT/decode_resources.txt"
  timeout 200 $b/moeflow bench --backend cuda --models ${2:-qwen1.5-moe-a2.7b,qwen3-30b-a3b,deepseek-v3,mixtral-8x7b} \
    --tokens ${3:-1,8,32} --plans graph --experts-kernels ${4:-auto,cuda.decode_gemv} --scope experts --json "$OUT/validate_bench.jsonl" \
    > "$OUT/validate_bench.log" 2>&1; echo "rc=$?"; grep -v "^skipped" "$OUT/validate_bench.log" | tail -26
  exit 0
fi
if [[ $mode == fusedprof ]]; then
  # Nsight Compute's full report of the fused decode kernel and of the chain's decode kernels (T=1).
  m=${2:-qwen1.5-moe-a2.7b}
  timeout 200 ncu --clock-control none --set full --kernel-name regex:fused_decode --launch-skip 3 --launch-count 1 --print-details all \
    $b/moeflow run --backend cuda --model $m --tokens 1 --scope experts --runs 5 > "$OUT/prof_fused.txt" 2>&1; echo "rc=$?"
  timeout 200 ncu --clock-control none --set full --kernel-name regex:decode_ --launch-skip 6 --launch-count 2 --print-details all \
    $b/moeflow run --backend cuda --model $m --tokens 1 --scope experts --runs 5 --no-fuse > "$OUT/prof_chain.txt" 2>&1; echo "rc=$?"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Waves Per SM|Stall|Block Limit" "$OUT/prof_fused.txt" | head -30
  exit 0
fi
if [[ $mode == fused ]]; then
  # The fused decode kernel (dispatch + MLP + combine in one launch): resources, its tests plain and
  # under memcheck / racecheck / synccheck, the layers' tests that now plan it, run --check per
  # preset at T=1, then the experts path fused against the chain (graph replays) where it applies.
  obj=$(find $b -name fused_decode.cu.o | head -1)
  echo "== resources: $(cuobjdump -res-usage "$obj" 2>&1 | grep -E "REG" | head -2 | tr -s ' ')" | tee "$OUT/fused_resources.txt"
  echo "== tests"; timeout 200 $b/moeflow_gpu_tests --gtest_filter='CudaFusedDecode.*:CudaLayerGraph.*:*CudaHfGolden*' \
    > "$OUT/fused_tests.log" 2>&1; echo "rc=$?"; grep -E "FAILED|Failure|PASSED|tests ran" "$OUT/fused_tests.log" | head -20
  for tool in memcheck racecheck synccheck; do
    timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 $b/moeflow_gpu_tests --gtest_brief=1 \
      --gtest_filter='CudaFusedDecode.*:CudaFusedSingleToken.*' > "$OUT/fused_$tool.log" 2>&1; echo "$tool rc=$?: $(tail -n 2 "$OUT/fused_$tool.log" | tr '\n' ' ')"
  done
  for m in qwen1.5-moe-a2.7b mixtral-8x7b qwen3-30b-a3b deepseek-v3; do
    $b/moeflow run --backend cuda --model $m --tokens 1 --scope experts --cuda-graph --check 2>&1 | grep -E "fused|check|error" | cut -c1-200
  done
  echo "== bench"
  timeout ${3:-240} $b/moeflow bench --backend cuda --models ${2:-qwen1.5-moe-a2.7b,qwen3-30b-a3b,deepseek-v3,mixtral-8x7b} \
    --tokens ${4:-1,8,32} --plans graph --experts-kernels auto,cuda.decode_gemv --scope experts --json "$OUT/fused_bench.jsonl" \
    > "$OUT/fused_bench.log" 2>&1; echo "rc=$?"; grep -v "^skipped" "$OUT/fused_bench.log" | tail -30
  echo "== whole layer, T=1 (the fused chain beside the shared expert)"
  timeout 120 $b/moeflow bench --backend cuda --models qwen1.5-moe-a2.7b,qwen3-30b-a3b --tokens 1 --plans serial,concurrent,graph \
    --experts-kernels auto,cuda.decode_gemv --scope layer --json "$OUT/fused_layer.jsonl" > "$OUT/fused_layer.log" 2>&1
  echo "rc=$?"; grep -v "^skipped" "$OUT/fused_layer.log" | tail -14
  echo "== ncu (kernels serialised, caches flushed between them)"
  for m in qwen1.5-moe-a2.7b qwen3-30b-a3b; do
    timeout 90 ncu --clock-control none --kernel-name regex:fused_decode --launch-skip 3 --launch-count 1 \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct \
      $b/moeflow run --backend cuda --model $m --tokens 1 --scope experts --runs 5 > "$OUT/fused_ncu_$m.log" 2>&1
    echo "$m: $(grep -E "gpu__time|dram__|lts__" "$OUT/fused_ncu_$m.log" | tr -s ' ' | tr '\n' ';')"
  done
  exit 0
fi
if [[ $mode == shared ]]; then
  # The shared expert folded into the fused decode kernel (ops/fuse_experts.hpp). Part `tests`: every
  # gpu test, the folded kernel's test under the three sanitizers, the resource report, run --check
  # of the full presets as planned. Part `bench`: whole layers as CUDA-graph replays as planned and
  # with each flag set of $VARIANTS (default: --no-fold-shared), then the layer beside its two
  # branches alone (issue 3's overlap figure).
  models=${3:-qwen1.5-moe-a2.7b deepseek-v3}
  if [[ ${2:-tests} == tests ]]; then
    tests_and_sanitizers 'CudaFusedDecodeShared.*' shared
    obj=$(find $b -name fused_decode.cu.o | head -1)
    echo "== resources: $(cuobjdump -res-usage "$obj" 2>&1 | grep -E "REG" | head -2 | tr -s ' ')" | tee "$OUT/fused_resources.txt"
    for m in $models; do for t in 1 4; do
      $b/moeflow run --backend cuda --model $m --tokens $t --plan concurrent --cuda-graph --check 2>&1 \
        | grep -E "fused_experts|check|error" | cut -c1-260
    done; done | tee "$OUT/run_checks.txt"
  else
    IFS=';' read -r -a variants <<< "${VARIANTS:-;--no-fold-shared}"  # flag sets, ';'-separated ('' = as planned)
    layer_timings "$models" "${4:-1 2 4}" "${variants[@]}"
    timeout 240 $b/moeflow bench --backend cuda --models ${models// /,} --tokens ${5:-1,4} --plans serial,concurrent,graph \
      --scope layer,routed,shared --runs 100 --json "$OUT/overlap.jsonl" > "$OUT/overlap.log" 2>&1; echo "rc=$?"
    grep -v "^skipped" "$OUT/overlap.log" | tail -30
  fi
  exit 0
fi
if [[ $mode == tune ]]; then
  # moeflow tune (experts and fused kernels) over the presets and T, then the plan it makes at T=1.
  echo "== gpu tests (tuning, fused)"; timeout 120 $b/moeflow_gpu_tests --gtest_brief=1 --gtest_filter='CudaFusedDecode.*:*Tun*' \
    > "$OUT/gpu_tests.log" 2>&1; echo "rc=$?"; tail -1 "$OUT/gpu_tests.log"
  timeout ${4:-500} $b/moeflow tune --models ${2:-qwen1.5-moe-a2.7b,qwen3-30b-a3b,deepseek-v3,mixtral-8x7b} --tokens ${3:-1,8,32} \
    --cache "$OUT/tuning.json" > "$OUT/tune.txt" 2> "$OUT/tune.log"; echo "rc=$?"; cat "$OUT/tune.txt"
  $b/moeflow plan --backend cuda --model qwen3-30b-a3b --tokens 1 --scope experts --tuning-cache "$OUT/tuning.json" 2>&1 | head -8
  exit 0
fi
if [[ $mode == anyt ]]; then
  # One CUDA graph for any T against a graph per T (experts path, kernels chosen by the planner).
  models=${2:-qwen1.5-moe-a2.7b,deepseek-v3,mixtral-8x7b,qwen3-30b-a3b}
  for tokens in ${3:-1,8,32,128 1,8,32,128,512,2048,8192}; do
    echo "== T in $tokens"
    timeout 270 $b/moeflow bench --backend cuda --models $models --tokens $tokens --plans graph,graph-any --scope experts \
      --json "$OUT/anyt_${tokens//,/_}.jsonl" 2>&1 | grep -v "^skipped" | tail -40
  done
  exit 0
fi
if [[ $mode == probe ]]; then
  echo "== CUDA-graph whole layer at T=1 (host-side launch cost), per-node trace of qwen3 experts path at T=8192"
  for m in qwen1.5-moe-a2.7b deepseek-v3 mixtral-8x7b qwen3-30b-a3b; do
    $b/moeflow run --backend cuda --model $m --tokens 1 --plan concurrent --cuda-graph --check 2>&1 | grep -E "^  $m|CUDA graph|check|error"
  done | tee "$OUT/graph_launch.txt"
  $b/moeflow run --backend cuda --model qwen3-30b-a3b --scope experts --tokens 8192 --plan concurrent \
    --trace "$OUT/qwen3_t8192_trace.json" 2>&1 | tee "$OUT/qwen3_t8192.txt" | head -20
  exit 0
fi
echo "== gpu tests"; timeout 300 $b/moeflow_gpu_tests --gtest_brief=1 > "$OUT/gpu_tests.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/gpu_tests.log"
filter='CudaExpertsPaddedToMax*:CudaKernels*:CublasGemm*:Families/CudaLayer.*qwen2_moe_concurrent*:Families/CudaLayer.*deepseek_v3_serial_grouped*:CudaLayerGraph*'
echo "== memcheck"; timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 $b/moeflow_gpu_tests --gtest_brief=1 --gtest_filter="$filter" > "$OUT/memcheck.log" 2>&1; echo "rc=$?"; tail -2 "$OUT/memcheck.log"
echo "== racecheck"; timeout 240 compute-sanitizer --tool racecheck --error-exitcode 9 $b/moeflow_gpu_tests --gtest_brief=1 --gtest_filter="$filter" > "$OUT/racecheck.log" 2>&1; echo "rc=$?"; tail -2 "$OUT/racecheck.log"
echo "== run --check per preset"
for m in qwen1.5-moe-a2.7b mixtral-8x7b qwen3-30b-a3b deepseek-v3; do
  for p in serial concurrent; do
    $b/moeflow run --backend cuda --model $m --tokens 64 --plan $p --check 2>&1 | grep -E "moeflow run|^  $m|check|error"
  done
done > "$OUT/run_checks.log"; cat "$OUT/run_checks.log" | grep -E "check|error" | head -20
$b/moeflow run --backend cuda --model qwen1.5-moe-a2.7b --tokens 1 --plan concurrent --cuda-graph --check --json > "$OUT/graph_t1.json" 2>&1
cat "$OUT/graph_t1.json" | head -40
