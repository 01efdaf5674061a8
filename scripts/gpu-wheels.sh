#!/usr/bin/env bash
# Build, on a machine that reaches PyPI, what scripts/gpu-check.sh needs on a GPU machine that reaches
# no package registry:
#   .whl/                        wheels (CPython 3.12, manylinux x86-64: the GPU image's Python) of the
#                                packages the benchmark and the tiny Snakemake run import and that image
#                                lacks: snakemake, opacus, dp-accounting, jsonschema and what they need
#                                (the versions of this checkout's .venv, which pins them)
#   resources/data/glue/SST-2/   SST-2's training file, for the tiny preset's training run
# Both are git-ignored. Carry both to the GPU machine; gpu-check.sh installs there, from .whl alone
# (pip --no-index), only the wheels whose package is missing.
#
#   bash scripts/gpu-wheels.sh [DATA_DIR]   # DATA_DIR: the raw-data mirror (default $PRIVTUNE_DATA_DIR,
#                                           # else ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${1:-${PRIVTUNE_DATA_DIR:-../shared/data}}

# Packages the GPU image already holds (its package list, as read there on 2026-11-17: the device
# notes' KINDS.md). Their dependencies are not fetched; anything else the closure needs is.
PRESENT="absl-py accelerate aiohttp attrs certifi charset-normalizer click cloudpickle filelock fsspec
huggingface-hub idna jinja2 joblib markupsafe matplotlib mpmath networkx numpy opt-einsum packaging pandas
peft pillow psutil pyyaml regex requests safetensors sacrebleu scikit-learn scipy setuptools six sympy
tabulate tokenizers torch tqdm transformers triton typing-extensions urllib3 wrapt"

mkdir -p .whl
# the dependency closure, under Python 3.12's markers, of what is not there; name==version per line
"$PY" - "$PRESENT" snakemake opacus dp-accounting jsonschema > .whl/requirements.txt <<'EOF'
import importlib.metadata as md, re, sys
from packaging.markers import default_environment
from packaging.requirements import Requirement

env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
present = set(sys.argv[1].split())
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
seen = {}

def walk(name):
    n = norm(name)
    if n in seen or n in present or n.startswith("nvidia-"):
        return
    seen[n] = md.distribution(name).version  # not installed here: an error, naming it
    for r in md.distribution(name).requires or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate(env):
            walk(req.name)

for root in sys.argv[2:]:
    walk(root)
print("\n".join(f"{n}=={v}" for n, v in sorted(seen.items())))
EOF
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
while read -r req; do
  name=${req%%==*}
  if ls .whl/ | grep -qi "^$(echo "$name" | tr -- '-.' '__')-${req##*==}-"; then continue; fi
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${PLATFORMS[@]}" -d .whl "$req" 2>/dev/null; then
    # no wheel on the index (a pure-Python sdist, e.g. connection-pool): build one here
    "$PY" -m pip wheel -q --no-deps -w .whl "$req"
  fi
done < .whl/requirements.txt
# a wheel built here must be pure Python to run there
if ls .whl/*.whl | grep -v -E -- '-none-any\.whl$|-cp312-|-abi3-'; then
  echo "gpu-wheels: the wheels above are neither pure Python nor for CPython 3.12" >&2; exit 1
fi

mkdir -p resources/data/glue/SST-2
if [ ! -s resources/data/glue/SST-2/train.tsv ]; then
  cp "$DATA/glue/SST-2/train.tsv" resources/data/glue/SST-2/train.tsv
fi
echo "gpu-wheels: $(ls .whl/*.whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1)), SST-2 in resources/data;" \
     "carry [\".whl\", \"resources/data/glue/SST-2\"] and run: bash scripts/gpu-check.sh"
