#!/usr/bin/env bash
# The prepared GPU check of nemo_aot: one command on a lent single-GPU machine (README.md here).
#
#   bash scripts/gpu_check/run.sh [--out DIR] [--budget SECONDS] [--keep-work]
#   bash scripts/gpu_check/run.sh --install-only TARGET [REQUIREMENTS]
#
# Installs the bundle (.gpu_bundle, built here by `python -m scripts.gpu_check.build_bundle`)
# into folders of its own with --no-deps (the machine's torch is never touched), then runs, each
# step with a timeout and going on after a failure:
#   probe (machine, versions, imports)  ->  in parallel: pytest -m gpu tests/gpu and the
#   train/convert/logits check, each under megatron-core 0.16 and under 0.19  ->  the
#   step benchmark (llama-1b, seq 1024, 4 and 8 pairs) alone on the GPU  ->  summary.
# Results land in --out (default $OUT, else ./gpu_check_out): summary.json, summary.txt,
# logs.tar.gz and the benchmark JSON files; scratch goes to <out>/work and is removed at the end
# (--keep-work keeps it). The whole run stays within --budget seconds (default 470).
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${GPU_CHECK_PYTHON:-python3}
BUNDLE=${GPU_CHECK_BUNDLE:-$REPO/.gpu_bundle}
OUT_DIR=${OUT:-$REPO/gpu_check_out}
BUDGET=470
KEEP=0
BENCH_SHAPE=${GPU_CHECK_BENCH_SHAPE:-llama-1b}
BENCH_PAIRS=${GPU_CHECK_BENCH_PAIRS:-4 8}
BENCH_SEQ=${GPU_CHECK_BENCH_SEQ:-1024}
# Only for a rehearsal on a CPU machine (README): put the target simulation first on the path.
PREFIX=${GPU_CHECK_PYTHONPATH_PREFIX:+$GPU_CHECK_PYTHONPATH_PREFIX:}

install_bundle() {  # TARGET REQUIREMENTS: the bundle's wheels, nothing else, into TARGET
    local target=$1 reqs=$2
    rm -rf "$target" && mkdir -p "$target" || return 1
    "$PY" -m pip install --isolated --no-index --find-links "$BUNDLE/wheels" --no-deps \
        --no-compile --no-cache-dir --disable-pip-version-check --quiet \
        ${GPU_CHECK_PIP_ARGS:-} --target "$target" -r "$reqs" || return 1
    # The machine's own torch (and its CUDA libraries) must stay the ones in use.
    if ls "$target" | grep -qiE '^(torch|nvidia|triton)([-_.]|$)'; then
        echo "the bundle installed torch/nvidia/triton into $target: refusing" >&2
        return 1
    fi
    echo "installed $(ls "$target" | grep -c 'dist-info$') distributions into $target"
}

if [ "${1:-}" = "--install-only" ]; then
    install_bundle "$2" "${3:-$BUNDLE/requirements.txt}"
    exit $?
fi
while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT_DIR=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --keep-work) KEEP=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

START=$(date +%s)
WORK=$OUT_DIR/work
mkdir -p "$OUT_DIR" && rm -rf "$WORK" && mkdir -p "$WORK/steps" "$WORK/logs" || exit 1
SITE16=$WORK/site-mcore016
SITE19=$WORK/site-mcore019
RESERVE=25  # seconds kept for the summary
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false
cd "$REPO" || exit 1

remaining() { echo $(( BUDGET - RESERVE - ($(date +%s) - START) )); }

record() {  # NAME STATUS RC SECONDS TIMEOUT [NOTE]
    printf '{"name": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout": %s, "note": "%s", "ended": %s}\n' \
        "$1" "$2" "$3" "$4" "$5" "${6:-}" "$(( $(date +%s) - START ))" > "$WORK/steps/$1.json"
    echo "[gpu_check] $1: $2 (rc $3, $4 s)"
}

step() {  # NAME TIMEOUT SITE COMMAND...: run with PYTHONPATH=repo:SITE, log to logs/NAME.log
    local name=$1 limit=$2 site=$3; shift 3
    local left; left=$(remaining)
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        record "$name" skipped 0 0 0 "out of time"
        return 0
    fi
    if [ -n "$site" ] && [ ! -d "$site" ]; then
        record "$name" skipped 0 0 "$limit" "no install at $site"
        return 0
    fi
    local t0=$SECONDS rc status
    echo "[gpu_check] $name: start (timeout $limit s)"
    PYTHONPATH="$PREFIX$REPO${site:+:$site}" timeout -k 15 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    case $rc in 0) status=pass ;; 124|137) status=timeout ;; *) status=fail ;; esac
    record "$name" "$status" "$rc" $(( SECONDS - t0 )) "$limit"
}

gpu_tag() {  # h100 / h200 / a100 / ... from the device name; cpu without a GPU
    "$PY" -c 'import re, torch
n = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else "cpu"
m = re.search(r"\b([a-z]\d{2,4})\b", n)
print(m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", n).strip("-"))' 2>/dev/null || echo unknown
}

# ---- install (the machine has no network: everything comes from the bundle)
if [ -f "$BUNDLE/requirements.txt" ]; then
    SELF=$REPO/scripts/gpu_check/run.sh
    step install_mcore016 120 "" bash "$SELF" --install-only "$SITE16" "$BUNDLE/requirements.txt"
    grep -q '"pass"' "$WORK/steps/install_mcore016.json" || rm -rf "$SITE16"
    if [ -f "$BUNDLE/requirements-mcore019.txt" ]; then
        step install_mcore019 120 "" bash "$SELF" --install-only "$SITE19" \
            "$BUNDLE/requirements-mcore019.txt"
        grep -q '"pass"' "$WORK/steps/install_mcore019.json" || rm -rf "$SITE19"
    else
        record install_mcore019 skipped 0 0 0 "the bundle has no second pass"
    fi
else
    record install_mcore016 fail 1 0 0 "no bundle at $BUNDLE (build it with python -m scripts.gpu_check.build_bundle and carry .gpu_bundle)"
fi
cp "$BUNDLE/manifest.json" "$WORK/bundle_manifest.json" 2>/dev/null
"$PY" -m pip list --format=json > "$WORK/logs/machine_pip_list.json" 2>/dev/null
nvidia-smi > "$WORK/logs/nvidia_smi.txt" 2>&1

# ---- what the machine is, and whether the heavy imports work under each install
for pass in mcore016 mcore019; do
    site=$WORK/site-$pass
    step "probe_$pass" 90 "$site" "$PY" -m scripts.gpu_check.probe --site "$site" \
        --out "$WORK/probe_$pass.json" &
done
wait

# ---- small GPU work, in parallel (tiny models; the GPU and 16 cores have room for all four)
export OMP_NUM_THREADS=4
step pytest_mcore016 300 "$SITE16" "$PY" -m pytest -m gpu tests/gpu -p no:cacheprovider -rA \
    --junitxml="$WORK/pytest_mcore016.xml" &
step train_check 300 "$SITE16" "$PY" -m scripts.gpu_check.train_check --work "$WORK/train" \
    --result "$WORK/train_check.json" --steps 20 &
step pytest_mcore019 300 "$SITE19" "$PY" -m pytest -m gpu tests/gpu -p no:cacheprovider -rA \
    --junitxml="$WORK/pytest_mcore019.xml" &
step train_check_mcore019 300 "$SITE19" "$PY" -m scripts.gpu_check.train_check \
    --work "$WORK/train_mcore019" --result "$WORK/train_check_mcore019.json" --steps 20 &
wait
unset OMP_NUM_THREADS

# ---- the step benchmark, alone on the GPU (timings)
TAG=$(gpu_tag)
for pairs in $BENCH_PAIRS; do
    step "bench_p$pairs" 200 "$SITE16" "$PY" scripts/bench_aot_step.py --shape "$BENCH_SHAPE" \
        --pairs "$pairs" --seq "$BENCH_SEQ" \
        --out "$OUT_DIR/aot_step_${BENCH_SHAPE}_p${pairs}_s${BENCH_SEQ}_${TAG}.json"
done

# ---- summary (JSON + text) and the logs in one archive
RESERVE=0
PYTHONPATH="$REPO" timeout 60 "$PY" -m scripts.gpu_check.summarize --work "$WORK" --out "$OUT_DIR" \
    --seconds $(( $(date +%s) - START )) --gpu-tag "$TAG"
SUMMARY_RC=$?
tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" --exclude='site-*' --exclude='checkpoints' \
    --exclude='*.nemo' --exclude='*.safetensors' --exclude='*.pt' --exclude='policy_extracted' \
    . 2>/dev/null
[ "$KEEP" = 1 ] || rm -rf "$WORK"
echo "[gpu_check] done in $(( $(date +%s) - START )) s; results in $OUT_DIR"
exit $SUMMARY_RC
