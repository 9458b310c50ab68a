#!/usr/bin/env bash
# The compatibility tier: the same tests under every supported megatron-core release, compared
# with the numbers of the baseline release (0.16.1, the one `make test` runs).
#
#   tests/compat/run.sh                    the full tier for 0.17.0 0.18.0 0.19.2 (make test-compat)
#   tests/compat/run.sh 0.18.0             the full tier for the named releases
#   tests/compat/run.sh --smoke 0.19.2     the CI part: a few minutes for one release
#
# Each release gets one cached environment, .compat/mcore-X.Y.Z (gitignored): a venv on the
# project venv's interpreter whose own site-packages hold only megatron-core X.Y.Z (installed
# with --no-deps --ignore-requires-python: 0.17+ declare Python >= 3.12, this tier runs 3.11)
# and, from 0.18 (which imports it), triton; everything else comes from the project venv through
# a .pth file placed after the venv's own site-packages (a venv made from a venv does not see
# the first venv's packages, --system-site-packages reaches only the base interpreter's).
# The baseline's records (.compat/records/0.16.1) are kept until the code under test changes.
# Every test run is logged to .compat/logs/; a release's measured differences from the
# baseline are in .compat/records/X.Y.Z/diffs.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
COMPAT=${COMPAT_DIR:-$ROOT/.compat}
BASELINE=0.16.1
DEFAULT_VERSIONS=(0.17.0 0.18.0 0.19.2)
TIMEOUT=${COMPAT_TIMEOUT:-3600}

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
versions=("$@")
if [[ ${#versions[@]} -eq 0 ]]; then
  if [[ $smoke -eq 1 ]]; then versions=("${DEFAULT_VERSIONS[-1]}"); else versions=("${DEFAULT_VERSIONS[@]}"); fi
fi
mkdir -p "$COMPAT/logs" "$COMPAT/records"

site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

env_for() {  # env_for X.Y.Z -> prints the environment's python, building it once
  local version=$1 dir="$COMPAT/mcore-$1"
  if [[ ! -f "$dir/.ready" ]]; then
    echo "compat: building $dir" >&2
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --no-deps --ignore-requires-python \
      "megatron-core==$version" >&2
    if "$dir/bin/python" - "$version" <<'EOF'
import sys
major, minor = (int(x) for x in sys.argv[1].split(".")[:2])
sys.exit(0 if (major, minor) >= (0, 18) else 1)
EOF
    then
      "$dir/bin/python" -m pip install --quiet --no-deps triton >&2
    fi
    echo "import site; site.addsitedir('$(site_of "$PY")')" > "$(site_of "$dir/bin/python")/zz_project_venv.pth"
    local got
    # The release the imported module declares (package_info.VERSION). Not __version__: from
    # 0.19 that appends the commit of any git repository around the install, and .compat/ sits
    # inside this one.
    got=$(cd /tmp && "$dir/bin/python" -W ignore -c \
      'from megatron.core import package_info as p; print(".".join(map(str, p.VERSION[:3])) + str(p.VERSION[3]))' \
      2>/dev/null | tail -1)
    if [[ "$got" != "$version" ]]; then
      echo "compat: $dir imports megatron-core '$got', not $version" >&2
      exit 1
    fi
    touch "$dir/.ready"
  fi
  echo "$dir/bin/python"
}

run_tests() {  # run_tests PYTHON LOGNAME ARGS...
  local python=$1 log="$COMPAT/logs/$2.log"
  shift 2
  echo "compat: $(basename "$log" .log): pytest $*" >&2
  local start=$SECONDS status=0
  NEMO_AOT_COMPAT_DIR="$COMPAT/records" PYTHONPATH="$ROOT" timeout "$TIMEOUT" \
    "$python" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1 || status=$?
  echo "compat: $(basename "$log" .log): exit $status in $((SECONDS - start)) s ($(tail -1 "$log"))" >&2
  return $status
}

# The code under test (its content): the baseline's records are reused only for the same code.
code_key() {
  find nemo_aot tests -name '*.py' -not -path '*/__pycache__/*' -print0 | sort -z \
    | xargs -0 sha256sum | sha256sum | cut -c1-16
}

LAYOUTS=(
  "tests/distributed/test_layout_invariance.py::test_layout_matches_single_process[tp2]"
  "tests/distributed/test_layout_invariance.py::test_layout_matches_single_process[tp2_sp]"
  "tests/distributed/test_layout_invariance.py::test_layout_matches_single_process[pp2]"
  "tests/distributed/test_layout_invariance.py::test_layout_matches_single_process[pp2_vpp2]"
  "tests/distributed/test_lora_layouts.py::test_lora_layout_matches_single_process[tp2]"
  "tests/distributed/test_lora_layouts.py::test_only_adapters_train_under_ddp_and_the_distributed_optimizer"
  "tests/e2e/test_resume.py::test_resume_with_the_distributed_optimizer_matches_uninterrupted_run"
  # Qwen3.5 (Gated DeltaNet, whose megatron module became a package in 0.19): logits against
  # transformers at one process, TP2 and PP2, LoRA on the GDN projections
  "tests/unit/test_conversion_qwen35.py"
  "tests/distributed/test_qwen35_layouts.py"
  "tests/unit/test_conversion_qwen35_moe.py"
)
SMOKE_LAYOUTS=(
  "tests/distributed/test_layout_invariance.py::test_layout_matches_single_process[tp2_sp]"
  "tests/distributed/test_layout_invariance.py::test_layout_matches_single_process[pp2_vpp2]"
  "tests/distributed/test_lora_layouts.py::test_lora_layout_matches_single_process[tp2]"
  "tests/unit/test_conversion_qwen35.py"
)
AGREE=(tests/distributed/test_versions_one_step.py tests/e2e/test_versions_agree.py)

base_py=$(env_for "$BASELINE")
key=$(code_key)
if [[ "$(cat "$COMPAT/records/$BASELINE/key" 2>/dev/null)" != "$key" ]]; then
  rm -rf "$COMPAT/records"
  mkdir -p "$COMPAT/records/$BASELINE"
  run_tests "$base_py" "baseline-$BASELINE" "${AGREE[@]}" -k "not newer"
  echo "$key" > "$COMPAT/records/$BASELINE/key"
else
  echo "compat: baseline $BASELINE records reused (same code)" >&2
fi

keeps_megatron() {  # pip would install nemo_aot into this environment without replacing it
  local python=$1 version=$2 plan
  plan=$("$python" -m pip install --dry-run --ignore-requires-python "$ROOT" 2>&1 | grep '^Would install' || true)
  echo "compat: $version: installing nemo_aot: ${plan:-nothing to install}" >&2
  if grep -qi 'megatron' <<<"$plan"; then
    echo "compat: $version: pip would replace megatron-core $version" >&2
    return 1
  fi
}

failed=()
for version in "${versions[@]}"; do
  python=$(env_for "$version")
  rm -rf "$COMPAT/records/$version"
  keeps_megatron "$python" "$version" || failed+=("$version-pip")
  if [[ $smoke -eq 1 ]]; then
    selection=("${SMOKE_LAYOUTS[@]}" "${AGREE[@]}" -k "not newer and not demo")
  else
    selection=("${LAYOUTS[@]}" "${AGREE[@]}" -k "not newer")
  fi
  run_tests "$python" "$version" "${selection[@]}" || failed+=("$version")
  # This release's checkpoint under the baseline: resumed, or refused with the reason.
  NEMO_AOT_COMPAT_NEWER=$version run_tests "$base_py" "$version-under-$BASELINE" \
    tests/e2e/test_versions_agree.py -k newer || failed+=("$version-under-$BASELINE")
done

for version in "${versions[@]}"; do
  echo "== megatron-core $version vs $BASELINE (largest differences):"
  cat "$COMPAT/records/$version/diffs.json" 2>/dev/null || echo "(none recorded)"
  echo
done
echo "== under $BASELINE:"
cat "$COMPAT/records/$BASELINE/diffs.json" 2>/dev/null || echo "(none recorded)"
echo
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "compat: FAILED: ${failed[*]} (logs in $COMPAT/logs/)" >&2
  exit 1
fi
echo "compat: passed for ${versions[*]}" >&2
