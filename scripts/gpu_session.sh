#!/usr/bin/env bash
# One short session on a GPU machine (at most about 10 minutes on one H200; the session has 15 in all):
#   1. the whole test suite on CUDA, with AuxiLearn's outer steps replayed from CUDA graphs wherever
#      they apply (AUXFRAME_TEST_DEVICE=cuda AUXFRAME_TEST_CUDA_GRAPH=auto): the condition for
#      making cuda_graph='auto' AuxiLearn's default; tests/test_cuda.py (GPU against CPU, precision,
#      deterministic resume, compile) is part of it;
#   2. the benchmarks on a quiet GPU: the real-size ones (bench/real_scale.py: S4L CIFAR-10 and
#      CelebA 1%, auxframe against a hand-written loop, bf16 against fp32, peak memory per
#      weighting), then the engine, weighting and AuxiLearn ones;
#   3. with GRID=1 only, the digits results grid of scripts/protocol.py (several more minutes).
# Everything it writes goes to $OUT: device.txt, suite.txt, bench.txt (and protocol.txt, runs.tar.gz).
#
#   OUT=/some/folder bash scripts/gpu_session.sh
#
# The machine has PyTorch, numpy, scikit-learn and pytest but not gin-config or albumentations, and
# no network: their wheels travel in .whl/ (ignored by git; make it here and carry the folder):
#   pip download --no-deps -d .whl gin-config==0.5.0 albumentations==2.0.8 albucore==0.0.24 \
#       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       simsimd==6.5.16 stringzilla==5.3.2
# The script builds auxframe's own wheel there (for its entry points) unless .whl/ already holds one.
# BENCH picks the benchmarks: real_s4l,real_celeba,auxilearn by default (about 6 minutes), 'all'
# adds engine,weightings,hypergrad (their GPU figures are in bench/README.md already).
set -u -o pipefail
OUT=${OUT:?set OUT to a folder for the results}
GRID=${GRID:-0}
BENCH=${BENCH:-real_s4l,real_celeba,auxilearn}
[ "$BENCH" = all ] && BENCH=real_s4l,real_celeba,auxilearn,engine,weightings,hypergrad
ls .whl/gin_config-*.whl >/dev/null 2>&1 || { echo "no gin-config wheel in .whl/ (see the header)"; exit 1; }
if ! ls .whl/auxframe-*.whl >/dev/null 2>&1; then
  python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl . > "$OUT/wheel.txt" 2>&1 \
    || { echo "building auxframe's wheel failed (setuptools >= 77 needed; see $OUT/wheel.txt): build it" \
              "elsewhere with 'pip wheel --no-deps -w .whl .'"; exit 1; }
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 WANDB_MODE=disabled
{ date -u +%Y-%m-%dT%H:%MZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
} | tee "$OUT/device.txt"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6" || echo "")

# 1. The whole suite on CUDA with cuda_graph='auto' (the CPU-only tests stay on the CPU by themselves).
# shellcheck disable=SC2086  # workers is empty or two words
AUXFRAME_TEST_DEVICE=cuda AUXFRAME_TEST_CUDA_GRAPH=auto timeout 240 python3 -m pytest -q -p no:cacheprovider \
    $workers -r fEs tests > "$OUT/suite.txt" 2>&1
echo "exit $?" >> "$OUT/suite.txt"
tail -n 3 "$OUT/suite.txt"

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
  bench engine 60 python3 bench/gradient_engine.py --device cuda --rounds 3 --calls 5
  bench weightings 90 python3 bench/weighting_throughput.py --device cuda --tasks k5,k39 --steps 20 --rounds 2
  bench hypergrad 30 python3 bench/hypergrad_methods.py --rounds 3 --calls 10
} > "$OUT/bench.txt" 2>&1
grep -E "^## |^exit " "$OUT/bench.txt"

# 3. The digits results grid (GRID=1): every method, n = 5 and 10, seeds 0-4, 14 runs at a time.
if [ "$GRID" = 1 ]; then
  python3 scripts/protocol.py run --out runs/protocol --param "train.device = 'cuda'" --n 5 10 --seeds 5 --jobs 14 \
      > "$OUT/protocol.txt" 2>&1
  tar czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='wandb' runs/protocol
fi
echo done
