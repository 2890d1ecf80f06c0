#!/usr/bin/env bash
# The wheels that scripts/gpu_session.sh needs on the lent GPU machine, into .whl/ (ignored by git).
#
# That machine has no network and its own image (Python 3.12, its own torch, numpy, scipy,
# scikit-learn, matplotlib, pytest, ...). What auxframe needs beyond it travels as wheels: gin-config,
# albumentations, Optuna, W&B, TorchJD with quadprog and cvxpy's solvers (ECOS for Nash-MTL,
# Clarabel for CAGrad), and what each of them needs that the image lacks. The versions are the ones this
# checkout's .venv holds (`pip install -e ".[dev]"`), so the GPU runs the same code as the CPU suite.
#
#   bash scripts/gpu_wheels.sh        # then: run(carry=[".whl"], command="OUT=$OUT bash scripts/gpu_session.sh")
#
# Left out on purpose, to stay inside the 64 MiB a device call may carry: scs (42 MB) and
# sparsediffpy (12 MB), which cvxpy's metadata requires but which neither TorchJD's Nash-MTL (ECOS)
# nor its CAGrad (Clarabel) imports. All of .whl/ comes to about 45 MB, the repository to about 5.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "no $PY: make the project's venv first (README: python3 -m venv .venv && .venv/bin/pip install -e \".[dev]\")"; exit 1; }
NAMES="gin-config albumentations albucore pydantic pydantic-core annotated-types typing-inspection simsimd stringzilla
optuna alembic colorlog sqlalchemy mako
torchjd quadprog qpsolvers cvxpy clarabel ecos osqp qdldl highspy cffi pycparser
wandb platformdirs sniffio distro tzdata googleapis-common-protos cwevals opentelemetry-api opentelemetry-sdk
opentelemetry-proto opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport opentelemetry-semantic-conventions"
# name==version for each name the venv has (a name a later release no longer needs is skipped).
reqs=$("$PY" - $NAMES <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF
)
# A fresh folder: two versions of one package in it would stop the install on the GPU machine.
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086  # one requirement per word
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl $reqs
# auxframe's own wheel, for its entry points (the plugins' registry).
"$PY" -m pip wheel -q --no-deps -w .whl .
echo "$(ls .whl | wc -l) wheels in .whl/, $(du -sh .whl | cut -f1)"
