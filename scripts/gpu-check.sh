#!/usr/bin/env bash
# The GPU check: on one GPU, in at most 8 minutes (every step under its own time limit),
#   1. the clipping benchmark on GPT-2 small, medium and large (non-private; ours, book-keeping and
#      two-pass; Opacus per-sample and ghost on the untied model), in fp32 and bf16, batch 16 × 128
#      tokens, with each method's largest batch (powers of two), all methods of a (shape, precision)
#      in one process (python -m privtune.bench.clipping --group --fit --budget-s);
#   2. a short real training run through Snakemake on the GPU: the tiny preset's DP SST-2 run
#      (config/tiny.yaml, gpu: 1), in a scratch copy of the workflow;
# and writes OUT_DIR/clipping_cuda.{json,png} (the figure: fp32; clipping_cuda_bf16.png: bf16; default
# OUT_DIR: results/benchmarks), OUT_DIR/gpu-check.log
# and OUT_DIR/tiny-train/{train_metrics,privacy}.json, also copied into $OUT when that is set (the
# device tool's folder of files to bring back).
#
# The GPU machine reaches no package registry: first, here, `bash scripts/gpu-wheels.sh` (wheels into
# .whl/, SST-2's training file into resources/data/); carry both; this script installs from .whl
# (pip --no-index) only what that machine lacks. Then, there: `bash scripts/gpu-check.sh`.
#
#   bash scripts/gpu-check.sh --device cpu [--out DIR] [--work DIR]
# runs the same steps with the same benchmark options on tiny GPT-2 shapes on the CPU, in a few minutes
# (OUT_DIR default results/benchmarks/gpu-check-cpu, files clipping_cpu.*): the slow test does.
# PYTHON: the interpreter (default: python3 on a GPU, .venv/bin/python on the CPU when it exists).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=cuda
OUT_DIR=
WORK=
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--out DIR] [--work DIR]" >&2; exit 2 ;;
  esac
done
case $DEVICE in cuda|cpu) ;; *) echo "--device is cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
if [ "$DEVICE" = cuda ]; then
  PY=${PYTHON:-python3}
  OUT_DIR=${OUT_DIR:-results/benchmarks}
  # GPT-2 small, medium, large (privtune.bench.workload.GPU_SHAPES)
  SHAPES=(--shapes gpt2 gpt2-medium gpt2-large)
  BATCH=16 SEQ=128 FIT_LIMIT=4096 GPU=1 CORES=8
  # seconds per step, 8 minutes in all: 15 (nvidia-smi) + 50 + 45 (environment) + 265 + 100
  INSTALL_S=50 ENV_S=45 BENCH_BUDGET_S=235 BENCH_S=265 SMK_S=100
else
  [ -x .venv/bin/python ] && PY=${PYTHON:-$ROOT/.venv/bin/python} || PY=${PYTHON:-python3}
  OUT_DIR=${OUT_DIR:-results/benchmarks/gpu-check-cpu}
  # three tiny GPT-2 shapes standing in for small, medium and large: the same code paths
  SHAPES=(--shapes-json '{"tiny-small": {"n_embd": 32, "n_layer": 1, "n_head": 2},
"tiny-medium": {"n_embd": 48, "n_layer": 2, "n_head": 2}, "tiny-large": {"n_embd": 64, "n_layer": 3, "n_head": 4}}')
  BATCH=2 SEQ=16 FIT_LIMIT=8 GPU=0 CORES=2
  INSTALL_S=120 ENV_S=120 BENCH_BUDGET_S=360 BENCH_S=480 SMK_S=300
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu-check.log
: > "$LOG"
START=$SECONDS
say() { echo "[gpu-check +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
FAILED=0

say "device $DEVICE, python $PY, out $OUT_DIR"
if [ "$DEVICE" = cuda ]; then
  timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1 ||
    say "nvidia-smi: none or failed"
fi

# 1. packages: install from .whl only those whose distribution is missing (none on a full .venv)
SITE=${TMPDIR:-/tmp}/privtune-gpu-check-site
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  MISSING=$(timeout 60 "$PY" - .whl/*.whl <<'EOF'
import importlib.metadata as md, os, sys
for path in sys.argv[1:]:
    name = os.path.basename(path).split("-")[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(path)
EOF
  )
  if [ -n "$MISSING" ]; then
    say "installing $(echo "$MISSING" | wc -l) wheels from .whl into $SITE"
    # shellcheck disable=SC2086
    if timeout "$INSTALL_S" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --target "$SITE" $MISSING >> "$LOG" 2>&1; then
      export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    else
      say "FAILED: installing the wheels"; FAILED=1
    fi
  else
    say "every package of .whl is installed already"
  fi
else
  say "no .whl folder (bash scripts/gpu-wheels.sh makes it): using the packages installed"
fi
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PRIVTUNE_OFFLINE=1
timeout "$ENV_S" "$PY" - "$DEVICE" >> "$LOG" 2>&1 <<'EOF' || { say "FAILED: the environment check (see the log)"; FAILED=1; }
import importlib.metadata as md, sys
import torch
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "opacus", "dp-accounting", "snakemake", "jsonschema"):
    print(name, md.version(name))
import opacus, dp_accounting, snakemake, jsonschema  # noqa: F401,E401  (importable, not just listed)
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("no GPU visible to torch")
EOF

# 2. the benchmark
say "benchmark: ${SHAPES[*]:1}; budget ${BENCH_BUDGET_S}s"
timeout "$BENCH_S" "$PY" -m privtune.bench.clipping --device "$DEVICE" "${SHAPES[@]}" \
  --methods nonprivate ours_bk ours_ghost opacus_hooks opacus_ghost_untied --precision fp32 bf16 \
  --batch "$BATCH" --seq "$SEQ" --steps 3 --fit --fit-limit "$FIT_LIMIT" --group --timeout "$BENCH_S" \
  --budget-s "$BENCH_BUDGET_S" --out "$OUT_DIR/clipping_$DEVICE.json" >> "$LOG" 2>&1
rc=$?
if [ $rc -ne 0 ] || [ ! -s "$OUT_DIR/clipping_$DEVICE.json" ]; then
  say "FAILED: the benchmark (exit $rc)"; FAILED=1
else
  say "benchmark written: $OUT_DIR/clipping_$DEVICE.json"
fi

# 3. a short real training run through Snakemake, in a scratch copy of the workflow
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/privtune-gpu-check.XXXXXX")}
mkdir -p "$WORK"
cp Snakefile config.yaml "$WORK/" && cp -r workflow config envs profiles "$WORK/"
if [ -s resources/data/glue/SST-2/train.tsv ]; then DATA=$ROOT/resources/data
else DATA=${PRIVTUNE_DATA_DIR:-$ROOT/../shared/data}; fi
TARGET="results/li2022/sst2/tiny-bert/full/eps~8/seed~0/privacy.json"
say "snakemake: tiny preset, $TARGET, gpu: $GPU, data $DATA, in $WORK"
(cd "$WORK" && PRIVTUNE_DATA_DIR=$DATA timeout "$SMK_S" "$PY" -m snakemake "$TARGET" --cores "$CORES" \
   --scheduler greedy --configfile config/tiny.yaml --config gpu="$GPU" --resources gpu="$GPU") \
  >> "$LOG" 2>&1
rc=$?
RUN=$WORK/$(dirname "$TARGET")
if [ $rc -eq 0 ] && [ -s "$RUN/train_metrics.json" ]; then
  mkdir -p "$OUT_DIR/tiny-train"
  cp "$RUN/train_metrics.json" "$RUN/privacy.json" "$OUT_DIR/tiny-train/"
  DEV_RUN=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['device'])" "$RUN/train_metrics.json")
  say "tiny training run done on $DEV_RUN"
  case $DEV_RUN in "$DEVICE"*) ;; *) say "FAILED: the run trained on $DEV_RUN, not $DEVICE"; FAILED=1 ;; esac
else
  say "FAILED: the Snakemake run (exit $rc)"; FAILED=1
  tail -n 30 "$WORK"/.snakemake/log/*.log >> "$LOG" 2>/dev/null
fi

# 4. summary, and the files for the device tool
"$PY" - "$OUT_DIR/clipping_$DEVICE.json" >> "$LOG" 2>&1 <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no benchmark JSON: {e}")
print(f"benchmark: {len(data['records'])} records in {data['seconds']:.0f} s")
for r in data["records"]:
    ok = r["status"] == "ok"
    print(f"  {r['shape']:12s} {r['precision']:5s} {r['method']:20s} {r['status']:10s}"
          + (f" {r['time_s']:.3f} s/step x{r.get('time_ratio', float('nan')):.2f}"
             f" mem x{r.get('memory_ratio') or float('nan'):.2f} largest batch {r.get('largest_batch')}" if ok
             else " " + r.get("error", "")[:100]))
EOF
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$OUT_DIR/clipping_$DEVICE.json" "$OUT_DIR/clipping_$DEVICE.png" "$OUT_DIR/clipping_${DEVICE}_bf16.png" \
     "$LOG" "$OUT/" 2>/dev/null
  cp "$OUT_DIR"/tiny-train/*.json "$OUT/" 2>/dev/null
fi
say "done in $((SECONDS - START)) s: $([ $FAILED -eq 0 ] && echo passed || echo FAILED)"
exit $FAILED
