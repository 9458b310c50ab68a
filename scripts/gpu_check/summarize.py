"""The GPU check's summary: what passed and failed, with versions and the GPU, as JSON and text.

    python -m scripts.gpu_check.summarize --work WORK --out OUT [--seconds N] [--gpu-tag h100]

Reads what run.sh left in WORK (steps/*.json, probe_*.json, pytest_*.xml, train_check*.json,
bundle_manifest.json) and the benchmark files in OUT; writes OUT/summary.json and
OUT/summary.txt. Standard library only. Exit status 0 when every required step passed (the
megatron-core 0.19 pass, tests and train check, is reported, not required).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

REQUIRED = ("install_mcore016", "probe_mcore016", "pytest_mcore016", "train_check", "bench_p4",
            "bench_p8")


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pytest_results(path: str) -> dict | None:
    """Counts and the failures (test id, message) of a junit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "tests": {}}
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed" if child.tag == "failure" else "errors"
                text = (child.text or child.get("message") or "").strip().splitlines()
                errors = [line for line in text if line.startswith("E ")][-6:] or text[-6:]
                out["failures"].append({"test": test, "kind": child.tag,
                                        "message": (child.get("message") or "")[:500],
                                        "error_lines": errors})
            elif child.tag == "skipped":
                status = "skipped"
        out[status] += 1
        out["tests"][test] = status
    return out


def second_pass_breaks(first: dict | None, second: dict | None) -> list[dict]:
    """Tests that pass under megatron-core 0.16 and fail under 0.19, with their errors."""
    if not first or not second:
        return []
    return [f for f in second["failures"] if first["tests"].get(f["test"]) == "passed"]


def bench_summary(path: str) -> dict:
    data = _load(path) or {}
    variants = {name: {k: v.get(k) for k in ("status", "reason", "tokens_per_s",
                                             "peak_memory_gib", "mfu", "median_step_s")
                       if v.get(k) is not None}
                for name, v in (data.get("variants") or {}).items()}
    return {"device": (data.get("device") or {}).get("name"), "variants": variants,
            "ratios": data.get("ratios"), "loss_check": data.get("loss_check")}


def versions(probe: dict | None) -> dict:
    if not probe:
        return {}
    pkgs = probe.get("packages", {})
    gpu = probe.get("gpu", {})
    return {"python": probe.get("python"), "torch": gpu.get("torch"), "cuda": gpu.get("cuda"),
            "nccl": gpu.get("nccl"),
            **{name: (pkgs.get(name) or {}).get("version") for name in pkgs}}


def summarize(work: str, out: str, seconds: float | None, tag: str | None) -> dict:
    steps = [_load(p) for p in sorted(glob.glob(os.path.join(work, "steps", "*.json")))]
    steps = sorted((s for s in steps if s), key=lambda s: (s.get("ended", 0), s["name"]))
    by_name = {s["name"]: s for s in steps}
    probes = {p: _load(os.path.join(work, f"probe_{p}.json")) for p in ("mcore016", "mcore019")}
    gpu = ((probes["mcore016"] or probes["mcore019"] or {}).get("gpu") or {})
    tests = {p: pytest_results(os.path.join(work, f"pytest_{p}.xml"))
             for p in ("mcore016", "mcore019")}
    train = _load(os.path.join(work, "train_check.json"))
    train019 = _load(os.path.join(work, "train_check_mcore019.json"))
    for result in (train, train019):
        for stage in (result or {}).get("stages", {}).values():
            stage.pop("traceback", None)
    manifest = _load(os.path.join(work, "bundle_manifest.json")) or {}
    missing = [name for name in REQUIRED if by_name.get(name, {}).get("status") != "pass"]
    summary = {
        "ok": not missing,
        "not_passed": missing,
        "seconds": seconds,
        "gpu": {"devices": gpu.get("devices"), "nvidia_smi": gpu.get("nvidia_smi"), "tag": tag},
        "versions": {p: versions(probe) for p, probe in probes.items()},
        "steps": steps,
        "pytest": {p: ({k: v for k, v in r.items() if k != "tests"} if r else None)
                   for p, r in tests.items()},
        "mcore019_breaks": second_pass_breaks(tests["mcore016"], tests["mcore019"]),
        "second_pass_ok": by_name.get("pytest_mcore019", {}).get("status") == "pass",
        "train_check": train,
        "train_check_mcore019": train019,
        "bench": {os.path.basename(p): bench_summary(p)
                  for p in sorted(glob.glob(os.path.join(out, "aot_step_*.json")))},
        "bundle": {k: v for k, v in manifest.items()
                   if k in ("built_at", "git", "total_bytes", "python")},
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text(summary))
    return summary


def _train_lines(key: str, t: dict | None) -> list:
    """The train/convert/logits check's lines, naming the megatron-core that gave them."""
    if not t:
        return []
    lines = [f"\n{key} (megatron-core {t.get('megatron_core')}, {t.get('device')}, "
             f"{t.get('precision')}): {'ok' if t.get('ok') else 'FAILED'}"]
    for name, st in t.get("stages", {}).items():
        extra = st.get("error", "")[:300]
        if name == "train" and st.get("train_loss"):
            extra = (f"loss {st['train_loss'][0]:.4f} -> {st['train_loss'][-1]:.4f}, "
                     f"validation {st.get('validation_loss')}, checks {st.get('checks')}")
        if name == "logits" and "max_abs_diff" in st:
            extra = (f"max |diff| {st['max_abs_diff']:.2e} (tol {st['tolerance']}), "
                     f"KL {st['kl']:.2e}, argmax agreement {st['argmax_agreement']:.3f}")
        state = "ok" if st.get("ok") else "FAILED"
        lines.append(f"  {state:6s} {name} ({st.get('seconds')} s) {extra}")
    return lines


def text(s: dict) -> str:
    lines = [f"GPU check: {'PASSED' if s['ok'] else 'FAILED: ' + ', '.join(s['not_passed'])}"
             f" in {s['seconds']} s"]
    for dev in s["gpu"]["devices"] or []:
        lines.append(f"GPU: {dev['name']} (sm {dev['capability']}, {dev['memory_gib']} GiB)")
    lines.append(f"nvidia-smi: {s['gpu']['nvidia_smi']}")
    for p, v in s["versions"].items():
        if v:
            keys = ("python", "torch", "cuda", "nccl", "megatron-core", "nemo-toolkit",
                    "transformers", "lightning", "transformer-engine", "apex", "liger-kernel")
            lines.append(f"{p}: " + ", ".join(f"{k} {v.get(k)}" for k in keys))
    lines.append("")
    for st in s["steps"]:
        note = f" - {st['note']}" if st.get("note") else ""
        lines.append(f"  {st['status']:8s} {st['name']:20s} {st['seconds']:>4} s "
                     f"(limit {st['timeout']} s, rc {st['rc']}){note}")
    for p, r in s["pytest"].items():
        if r:
            lines.append(f"\npytest {p}: {r['passed']} passed, {r['failed']} failed, "
                         f"{r['errors']} errors, {r['skipped']} skipped")
            for f_ in r["failures"]:
                lines.append(f"  {f_['test']}: {f_['message'][:200]}")
    if s["mcore019_breaks"]:
        lines.append("\nbroken by megatron-core 0.19 (passed under 0.16):")
        for b in s["mcore019_breaks"]:
            lines.append(f"  {b['test']}: {' | '.join(b['error_lines'])[:400]}")
    for key in ("train_check", "train_check_mcore019"):
        lines += _train_lines(key, s.get(key))
    for name, b in s["bench"].items():
        lines.append(f"\n{name} ({b['device']}):")
        for v, r in b["variants"].items():
            if r.get("status") == "ok":
                lines.append(f"  {v:16s} {r.get('tokens_per_s', 0):10.0f} tok/s  "
                             f"{r.get('peak_memory_gib', 0):6.2f} GiB  mfu {r.get('mfu')}")
            else:
                lines.append(f"  {v:16s} {r.get('status')}: {str(r.get('reason', ''))[:200]}")
        for ratio, r in (b["ratios"] or {}).items():
            lines.append(f"  {ratio}: tokens/s x{r.get('tokens_per_s', 0):.2f}, "
                         f"memory x{r.get('peak_memory', 0):.2f}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float)
    p.add_argument("--gpu-tag")
    args = p.parse_args(argv)
    summary = summarize(args.work, args.out, args.seconds, args.gpu_tag)
    print(text(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
