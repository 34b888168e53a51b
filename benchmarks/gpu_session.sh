#!/usr/bin/env bash
# The GPU checks of docs/gpu-runbook.md in groups that each fit one device call (600 s), so a
# session's scarce GPU minutes go to measuring, not to typing commands. Run on the GPU machine from
# the repository root, after the environment set-up of the runbook (Ray/pydantic wheels, the
# project installed, and `deep_ep` importable for the DeepEP steps):
#
#   bash benchmarks/gpu_session.sh GROUP    # GROUP: k1 | k1-verify | k1-fp8 | k1-h200 | k1-gaps | k1-tune | k1-decode | k1-breakdown | k1-w4a8 | k1-preload | k1-preload-prefill | x2-comm | x2-layer | x2-step | x2-run
#
# Every command runs under its own `timeout`, its output goes to <dir>/<group>-<n>.log (and the
# terminal), a failing command does not stop the group, and the group ends with one line per
# command: exit status, seconds, command. Benchmarks write their JSON under <dir>/results. <dir> is
# $GPU_SESSION_DIR (default /tmp/gpu-session-<group>); at the end (and after each command) it is
# packed into one file, $OUT/<group>.tgz, because the device tool brings back only a few files.
set -u
group=${1:-}
OUT=${OUT:-$PWD/gpu-out}
RES=${GPU_SESSION_DIR:-/tmp/gpu-session-$group}
mkdir -p "$RES/results" "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

summary=()
n=0
step() {  # step SECONDS COMMAND...
  local limit=$1 rc t0
  shift
  n=$((n + 1))
  echo "=== [$group $n] $*" | tee "$RES/$group-$n.log"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$RES/$group-$n.log"
  rc=${PIPESTATUS[0]}
  summary+=("rc=$rc $(($(date +%s) - t0))s $*")
  tar czf "$OUT/$group.tgz" -C "$RES" . 2>/dev/null  # what is done so far survives a cut-off call
}

need_deep_ep() {
  if ! python -c "import deep_ep" 2>/dev/null; then
    echo "deep_ep is not importable: set it up first (docs/gpu-runbook.md, 'DeepEP')" >&2
    exit 2
  fi
}

cfg=deploy/configs
case "$group" in
  k1)  # one GPU: kernels, the single-GPU DeepEP checks, the main job with DeepEP low-latency
    step 240 python -m pytest -q -m gpu tests/gpu/test_kernels_k1_gpu.py tests/gpu/test_fused_moe_gpu.py \
      tests/kernels/test_router_gemm.py tests/kernels/test_launch.py tests/unit/test_resources.py
    step 120 python -m pytest -q -m gpu -rA tests/gpu/test_deepep_single_gpu.py
    step 120 python -m ep_runtime.cli run --config $cfg/h200x1-deepep-ll.yaml --report "$RES/results/run-h200x1-deepep-ll.json"
    step 60 python benchmarks/bench_router_topk.py --out-dir "$RES/results"
    step 60 python benchmarks/bench_launch.py --out-dir "$RES/results"
    ;;
  k1-verify)  # one GPU, no DeepEP needed: the kernels' GPU tests, the runtime's CUDA-graph decode on one
    # NCCL rank (torch backend), and the fused vs unfused top-k sum with its bound
    step 300 python -m pytest -q -m gpu tests/gpu/test_kernels_k1_gpu.py tests/gpu/test_fused_moe_gpu.py \
      "tests/gpu/test_execution_gpu.py::test_execution_torch_backend_one_gpu"
    step 120 python benchmarks/bench_topk_sum.py --budget-s 90 --out-dir "$RES/results"
    ;;
  k1-fp8)  # one GPU, no DeepEP: fp8_block prefill with the RESCALE tiles (GPU check, then re-tuned at
    # DeepSeek-V3 T 2048/8192 beside the bf16 table entries, which gives the fp8 / bf16 ratio)
    step 150 python -m pytest -q -m gpu "tests/gpu/test_fused_moe_gpu.py::test_prefill_rescaled_accumulator_wide_tiles" \
      "tests/gpu/test_fused_moe_gpu.py::test_gate_up_quantised_output_bits"
    step 420 python benchmarks/bench_fused_moe.py --tune --tune-schemes fp8_block --shapes dsv3_e32,dsv3_e128 \
      --ts 2048,8192 --step-layers 0 --budget-s 400 --tune-budget-s 300 --out "$RES/results"
    mkdir -p "$RES/configs" && cp "$RES/results/fused_moe.json" "$RES/configs/" 2>/dev/null
    ;;
  k1-h200)  # one H200 (the issues' target device), no DeepEP: what its results lack since 2026-11-23 --
    # the router re-tuned and timed with the launcher of today, the fp8 epilogue bits, fp8_block prefill
    # re-tuned at DeepSeek-V3 E32/E128 beside the bf16 rows of the same run (then run k1-decode)
    step 150 python benchmarks/bench_router_gemm.py --tune --quick --out-dir "$RES/results"
    mkdir -p "$RES/configs" && cp kernels/configs/router_gemm.json "$RES/configs/"
    step 90 python -m pytest -q -m gpu "tests/gpu/test_fused_moe_gpu.py::test_gate_up_quantised_output_bits"
    step 330 python benchmarks/bench_fused_moe.py --tune --tune-schemes fp8_block --shapes dsv3_e128,dsv3_e32 \
      --ts 2048,8192 --step-layers 0 --budget-s 310 --tune-budget-s 240 --out "$RES/results2"
    cp "$RES/results2/fused_moe.json" "$RES/configs/" 2>/dev/null
    ;;
  k1-gaps)  # one GPU, no DeepEP: buckets the tables lacked (DeepSeek-V3 E128 T 512, between the decode
    # and prefill configs; Qwen3 prefill, fp8 untuned there) tuned, with the bf16 baseline of the same run
    step 200 python benchmarks/bench_fused_moe.py --tune --shapes dsv3_e128 --ts 512 --step-layers 0 \
      --budget-s 180 --tune-budget-s 150 --out "$RES/results"
    step 200 python benchmarks/bench_fused_moe.py --tune --shapes qwen3_30b --ts 2048,8192 --step-layers 0 \
      --budget-s 180 --tune-budget-s 150 --out "$RES/results2"
    mkdir -p "$RES/configs" && cp "$RES/results/fused_moe.json" "$RES/configs/fused_moe-e128.json" 2>/dev/null
    cp "$RES/results2/fused_moe.json" "$RES/configs/fused_moe-qwen3.json" 2>/dev/null
    ;;
  k1-tune)  # one GPU: re-tune the kernel tables for this device (w4a8 also tries INT4_MAGIC)
    step 150 python benchmarks/bench_router_gemm.py --tune --quick --out-dir "$RES/results"
    step 180 python benchmarks/bench_masked_gemm.py --tune --out-dir "$RES/results"
    step 250 python benchmarks/bench_fused_moe.py --quick --tune --budget-s 230 --out "$RES/results"
    step 60 python benchmarks/bench_sustained.py --out-dir "$RES/results"
    mkdir -p "$RES/configs" && cp kernels/configs/*.json "$RES/configs/"
    ;;
  k1-decode)  # one GPU: fused MoE decode buckets (T 1-32, bf16) re-tuned on whole graph-replayed calls,
    # each row also timed as a step (consecutive calls on per-layer weight copies), both layouts
    step 300 python benchmarks/bench_fused_moe.py --tune --tune-all --masked-decode --no-fp8 --ts 1,2,4,8,16,32 \
      --budget-s 250 --tune-budget-s 200 --out "$RES/results"
    mkdir -p "$RES/configs" && cp "$RES/results/fused_moe.json" "$RES/configs/"
    ;;
  k1-breakdown)  # one GPU: per-kernel times and launch gaps of decode calls that miss their roofline
    # (Qwen3 fused decode, masked w4a8/fp8) beside ones that meet it, from CUDA-graph replays
    step 240 python benchmarks/bench_breakdown.py --out-dir "$RES/results"
    ;;
  k1-w4a8)  # one GPU: the masked w4a8 entries re-tuned, now scored against the same entries with
    # FOLD_SCALE (group scales folded into the fp16 weights: the K loop keeps its dots in flight), then
    # the w4a8 rows of all three models and the per-kernel breakdown of the w4a8 decode calls
    step 330 python benchmarks/bench_masked_gemm.py --tune --schemes w4a8 --out-dir "$RES/results"
    mkdir -p "$RES/configs" && cp kernels/configs/masked_grouped_gemm.json "$RES/configs/"
    step 150 python benchmarks/bench_breakdown.py --out-dir "$RES/results" \
      --cases masked-qwen3-r1-w4a8,masked-qwen3-r8-w4a8,masked-dsv3-r1-w4a8,masked-dsv3-r32-w4a8
    ;;
  k1-preload)  # one GPU: fp8_block decode with SCALE_PRELOAD (the K range's scales loaded before the K
    # loop, fused_moe.PRELOAD_NOTE) as a tuning candidate: the masked fp8_block entries first (A/B of each
    # winner with it), then the fused decode buckets (the tuner pairs every tile with and without it;
    # bf16 rows and the masked layout, with the entries just tuned, in the same run)
    step 240 python benchmarks/bench_masked_gemm.py --tune --schemes fp8_block --out-dir "$RES/results2"
    mkdir -p "$RES/configs" && cp kernels/configs/masked_grouped_gemm.json "$RES/configs/"
    step 330 python benchmarks/bench_fused_moe.py --tune --tune-all --tune-schemes fp8_block --ts 1,4,16,32 \
      --masked-decode --step-layers 0 --budget-s 310 --tune-budget-s 240 --out "$RES/results"
    cp "$RES/results/fused_moe.json" "$RES/configs/" 2>/dev/null
    ;;
  k1-preload-prefill)  # one GPU: fp8_block prefill re-tuned with SCALE_PRELOAD candidates (down tiles, and
    # the gate_up tiles that do not spill with it) beside the bf16 rows of the same run: Qwen3, the worst
    # fp8/bf16 ratio (0.99x at T 8192 on the H100), and DeepSeek-V3 E128
    step 560 python benchmarks/bench_fused_moe.py --tune --tune-schemes fp8_block --shapes qwen3_30b,dsv3_e128 \
      --ts 2048,8192 --step-layers 0 --budget-s 540 --tune-budget-s 420 --out "$RES/results"
    mkdir -p "$RES/configs" && cp "$RES/results/fused_moe.json" "$RES/configs/" 2>/dev/null
    ;;
  x2-comm)  # issue 4: DeepEP vs the torch backend, then raw DeepEP vs the runtime
    need_deep_ep
    step 230 env EP_GPU_TEST_TIMEOUT=200 python -m pytest -q -s -m gpu tests/gpu/test_deepep_gpu.py
    step 200 python benchmarks/bench_dispatch.py --out-dir "$RES/results"
    ;;
  x2-layer)  # issues 5 and 7: the layer and the execution switches on 2 GPUs, then the layer benchmark
    need_deep_ep
    step 300 python -m pytest -q -m gpu tests/gpu/test_layer_gpu.py tests/gpu/test_execution_gpu.py
    step 120 python benchmarks/bench_layer.py --backend deepep --out-dir "$RES/results"
    step 100 python benchmarks/bench_layer.py --backend torch --out-dir "$RES/results"
    ;;
  x2-step)  # issue 7: the whole step, every switch, both backends
    need_deep_ep
    step 480 python benchmarks/bench_step.py --out-dir "$RES/results" --timeout 450
    ;;
  x2-run)  # issues 6 and 8: the main job through Ray on 2 GPUs, then a killed rank
    need_deep_ep
    step 200 python -m ep_runtime.cli run --config $cfg/h200x2-deepep.yaml --report "$RES/results/run-h200x2-deepep.json"
    step 120 python -m ep_runtime.cli run --config $cfg/h200x2-deepep.yaml --steps 4 --fault 1:decode:kill
    # the same job with every GPU visible to every rank (Ray's per-actor CUDA_VISIBLE_DEVICES off):
    # the fallback docs/deploy.md names if a library cannot reach peers it cannot see
    step 200 env RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 python -m ep_runtime.cli run \
      --config $cfg/h200x2-deepep.yaml --report "$RES/results/run-h200x2-deepep-allvisible.json"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh k1|k1-verify|k1-fp8|k1-h200|k1-gaps|k1-tune|k1-decode|k1-breakdown|k1-w4a8|k1-preload|k1-preload-prefill|x2-comm|x2-layer|x2-step|x2-run" >&2
    exit 2
    ;;
esac

echo "=== $group summary"
printf '%s\n' "${summary[@]}" | tee "$RES/$group-summary.txt"
tar czf "$OUT/$group.tgz" -C "$RES" .
echo "packed: $OUT/$group.tgz (tar xzf it here; results/*.json go to benchmarks/results/)"
