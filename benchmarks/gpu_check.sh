#!/usr/bin/env bash
# The GPU tier in one command: `pytest -m gpu tests/gpu` (the whole stack on one GPU, tests/gpu/test_gpu_stack.py; the
# multi-GPU checks skip below 2 GPUs), then `python -m benchmarks gpu` (tokens/s and MFU of llama3_1b, bf16 autocast,
# per-block compile), then ONE summary table: each check, pass/fail/skip, seconds, its key number.
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine; under 8 minutes on one H200 (each step has a timeout)
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on the CPU at tiny sizes (also: DEVICE=cpu)
#
# Options: --out DIR (keep pytest.xml, pytest.log, bench.json, bench.log there; default a temporary directory),
# -k EXPR (pytest's test selection), --no-tests, --no-bench, --preset NAME (the benchmark's model).
# Timeouts in seconds: GPU_CHECK_TESTS_TIMEOUT (default 240), GPU_CHECK_BENCH_TIMEOUT (default 210).
# Exit status: 0 when no check failed (skips allowed), 1 when one did (a timeout or a crash counts), 2 on bad usage.
# tests/unit/test_gpu_check.py runs the dry run and a forced failure.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0; out=""; select=""; tests=1; bench=1; preset=""
[[ "${DEVICE:-}" == "cpu" ]] && dry=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="${2:?--out needs a directory}"; shift ;;
    -k) select="${2:?-k needs an expression}"; shift ;;
    --no-tests) tests=0 ;;
    --no-bench) bench=0 ;;
    --preset) preset="${2:?--preset needs a model preset name}"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$out" ]]; then out="$(mktemp -d -t gpu_check.XXXXXX)"; fi
mkdir -p "$out"
rm -f "$out"/pytest.xml "$out"/bench.json "$out"/steps.txt
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ $dry == 1 ]]; then
  export GPU_CHECK_DRY_RUN=1 CUDA_VISIBLE_DEVICES=""  # tests/gpu/conftest.py: the gpu tests on the CPU
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # a shared CPU: spinning OpenMP threads stall when a core is taken
fi
tests_timeout="${GPU_CHECK_TESTS_TIMEOUT:-240}"
bench_timeout="${GPU_CHECK_BENCH_TIMEOUT:-210}"

step() {  # step NAME TIMEOUT LOG CMD...: run CMD under a timeout, output to the terminal and LOG; record rc, seconds
  local name="$1" limit="$2" log="$3"; shift 3
  local start; start="$(date +%s.%N)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  local rc="${PIPESTATUS[0]}"
  echo "$name $rc $start $(date +%s.%N) $limit" >> "$out/steps.txt"
}

if [[ $tests == 1 ]]; then
  args=(-m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider -o junit_family=xunit1 --junitxml="$out/pytest.xml")
  [[ -n "$select" ]] && args+=(-k "$select")
  step tests "$tests_timeout" "$out/pytest.log" python "${args[@]}"
fi
if [[ $bench == 1 ]]; then
  args=(-m benchmarks gpu --json "$out/bench.json")
  [[ $dry == 1 ]] && args+=(--device cpu --quick --no-compile)
  [[ -n "$preset" ]] && args+=(--preset "$preset")
  step bench "$bench_timeout" "$out/bench.log" python "${args[@]}"
fi

python - "$out" "$dry" <<'PY'
"""The summary table: pytest's JUnit report (one row per test, its `key` property) and the benchmark's JSON."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = {}
for line in (out / "steps.txt").read_text().splitlines() if (out / "steps.txt").exists() else []:
    name, rc, start, end, limit = line.split()
    steps[name] = {"rc": int(rc), "seconds": float(end) - float(start), "limit": limit}
rows = []


def last_line(path, default):
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()] if path.exists() else []
    return lines[-1].strip() if lines else default


def why(step):
    rc = step["rc"]
    return f"timed out after {step['limit']} s" if rc in (124, 137) else f"exit status {rc}"


if "tests" in steps:
    st = steps["tests"]
    cases = list(ET.parse(out / "pytest.xml").iter("testcase")) if (out / "pytest.xml").exists() else []
    for case in cases:
        name = case.get("name", "?").removeprefix("test_").replace("_", " ")
        if case.get("classname", "").endswith("test_multi_gpu"):
            name = "multi-GPU: " + name
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failed is not None:
            result, key = "fail", (failed.get("message") or failed.text or "").strip().splitlines()[0:1]
            key = key[0] if key else "failed"
        elif skipped is not None:
            result, key = "skip", (skipped.get("message") or "").strip()
        else:
            result, key = "pass", props.get("key", "")
        rows.append([name, result, f"{float(case.get('time', 0)):.1f}", key])
    if st["rc"] not in (0, 1) or (st["rc"] == 1 and not any(r[1] == "fail" for r in rows)) or not cases:
        rows.append(["pytest -m gpu tests/gpu", "fail", f"{st['seconds']:.1f}",
                     f"{why(st)}, {len(cases)} test(s) reported: {last_line(out / 'pytest.log', 'no output')}"])
if "bench" in steps:
    st = steps["bench"]
    name = "benchmark: python -m benchmarks gpu"
    try:
        r = json.loads((out / "bench.json").read_text())["gpu"] if st["rc"] == 0 else None
    except (OSError, ValueError, KeyError):
        r = None
    if r is None:
        rows.append([name, "fail", f"{st['seconds']:.1f}", f"{why(st)}: {last_line(out / 'bench.log', 'no output')}"])
    else:
        mfu = ("MFU n/a (no peak FLOP/s for this device)" if r["mfu"] is None
               else f"MFU {r['mfu']:.1%} ({'meets' if r['mfu'] >= 0.45 else 'below'} the 45% goal)")
        if r["mfu"] is not None and r.get("tied_head_flops_per_token"):
            mfu += f", {r['mfu_with_tied_head']:.1%} counting the tied lm_head"
        what = f"{r['preset']} {'bf16 + compile' if r['compile'] else 'bf16 eager'} on {r['device']}"
        rows.append([f"{name} ({what})", "pass", f"{st['seconds']:.1f}", f"{r['tokens_per_s']:,.0f} tokens/s, {mfu}"])

counts = {k: sum(r[1] == k for r in rows) for k in ("pass", "fail", "skip")}
total = sum(s["seconds"] for s in steps.values())
head = ["check", "result", "seconds", "key number"]
widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
print(f"\n## GPU check{' (dry run on the CPU: tiny sizes, the numbers mean nothing)' if dry else ''}: {out}\n")
for r in [head, ["-" * w for w in widths], *rows]:
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {total:.0f} s")
sys.exit(1 if counts["fail"] or not rows else 0)
PY
