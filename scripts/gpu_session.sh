#!/usr/bin/env bash
# One short session on a GPU machine (at most about 10 minutes on one H200; the session has 15 in all):
#   1. the whole test suite on CUDA, with AuxiLearn's outer steps replayed from CUDA graphs wherever
#      they apply (AUXFRAME_TEST_DEVICE=cuda AUXFRAME_TEST_CUDA_GRAPH=auto): the condition for
#      making cuda_graph='auto' AuxiLearn's default; tests/test_cuda.py (GPU against CPU, precision,
#      deterministic resume, compile) is part of it;
#   2. the benchmarks on a quiet GPU: the real-size ones (bench/real_scale.py: S4L CIFAR-10 and
#      CelebA 1%, auxframe against a hand-written loop, bf16 against fp32, peak memory per
#      weighting), and with BENCH the AuxiLearn, engine and weighting ones;
#   3. with GRID=1 only, the digits results grid of scripts/protocol.py (several more minutes).
# Everything it writes goes to $OUT: device.txt, suite.txt, bench1.txt (bench0.txt with SUITE=0; and
# protocol.txt, runs.tar.gz).
#
#   OUT=/some/folder bash scripts/gpu_session.sh
#
# The machine has PyTorch, numpy, scikit-learn and pytest but not gin-config, albumentations, Optuna,
# W&B or TorchJD, and no network: their wheels travel in .whl/ (ignored by git), with auxframe's own
# wheel (for its entry points). Make it here with `bash scripts/gpu_wheels.sh` (about 45 MB) and carry it.
#
# One command may run 10 minutes and the machine goes back after 30 s idle, so a session is two calls
# back to back (the second within those 30 s keeps the machine warm):
#   1. OUT=$OUT bash scripts/gpu_session.sh                                     # suite + real-size, ~9 min
#   2. SUITE=0 BENCH=auxilearn,weightings,engine OUT=$OUT bash scripts/gpu_session.sh   # ~4 min
# The second holds issue 15's GPU goals: throughput over Equal for every weighting at K = 5 and 39
# (weightings: <= 1.2 loss-based, <= 2.0 Gramian at K = 39) and the Gramian against LibMTL's
# per-task loop at K = 39 (engine: <= 0.5).
# BENCH picks the benchmarks (real_s4l,real_celeba by default); 'all' is every one (over 10 minutes
# with the suite: use it with SUITE=0). SUITE=0 skips the test suite.
set -u -o pipefail
OUT=${OUT:?set OUT to a folder for the results}
GRID=${GRID:-0}
SUITE=${SUITE:-1}
BENCH=${BENCH:-real_s4l,real_celeba}
[ "$BENCH" = all ] && BENCH=real_s4l,real_celeba,auxilearn,engine,weightings,hypergrad
for w in gin_config torchjd cvxpy auxframe; do
  ls .whl/$w-*.whl >/dev/null 2>&1 || { echo "no $w wheel in .whl/: run 'bash scripts/gpu_wheels.sh' here and carry .whl"; exit 1; }
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 WANDB_MODE=disabled
{ date -u +%Y-%m-%dT%H:%MZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
} | tee "$OUT/device.txt"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6" || echo "")

# 1. The whole suite on CUDA with cuda_graph='auto' (the CPU-only tests stay on the CPU by themselves).
if [ "$SUITE" = 1 ]; then
  # shellcheck disable=SC2086  # workers is empty or two words
  AUXFRAME_TEST_DEVICE=cuda AUXFRAME_TEST_CUDA_GRAPH=auto timeout 240 python3 -m pytest -q -p no:cacheprovider \
      $workers -r fEs tests > "$OUT/suite.txt" 2>&1
  echo "exit $?" >> "$OUT/suite.txt"
  tail -n 3 "$OUT/suite.txt"
fi

# 2. Benchmarks, each with its own time limit (bench/README.md says what each prints). The real-size
#    ones write their fixtures to /tmp first (CIFAR-10's pickles, 4,096 CelebA JPEGs: about 30 s).
#    Goals: auxframe / hand-written <= 1.05, data wait <= 10% of the step, bf16 >= 1.7x fp32 without
#    TF32 (S4L); peak memory per weighting at K = 39 (CelebA); AuxiLearn's outer step with its graph.
bench() { case ",$BENCH," in *",$1,"*) shift; echo "## $*"; timeout "$@"; echo "exit $?";; esac; }
{
  bench real_s4l 150 python3 bench/real_scale.py --setting s4l --device cuda --sections throughput,precision \
      --rounds 3 --warmup 10 --time-limit 50 --cache /tmp/auxframe-bench
  bench real_celeba 150 python3 bench/real_scale.py --setting celeba --device cuda --sections throughput,memory,workers \
      --rounds 3 --warmup 10 --time-limit 35 --workers-list 2,4,8,15 --cache /tmp/auxframe-bench
  bench auxilearn 45 python3 bench/auxilearn_cost.py --device cuda --sections ratio,throughput,graph --time-limit 12
  bench engine 60 python3 bench/gradient_engine.py --device cuda --rounds 3 --calls 5 --sections 1,3
  bench weightings 120 python3 bench/weighting_throughput.py --device cuda --tasks k5,k39 --steps 20 --rounds 2 \
      --warmup 5 --time-limit 100
  bench hypergrad 30 python3 bench/hypergrad_methods.py --rounds 3 --calls 10
} > "$OUT/bench$SUITE.txt" 2>&1
grep -E "^## |^exit " "$OUT/bench$SUITE.txt"

# 3. The digits results grid (GRID=1): every method, n = 5 and 10, seeds 0-4, 14 runs at a time.
if [ "$GRID" = 1 ]; then
  python3 scripts/protocol.py run --out runs/protocol --param "train.device = 'cuda'" --n 5 10 --seeds 5 --jobs 14 \
      > "$OUT/protocol.txt" 2>&1
  tar czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='wandb' runs/protocol
fi
echo done
