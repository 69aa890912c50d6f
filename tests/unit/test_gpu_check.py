"""``benchmarks/gpu_check.sh``'s plumbing, on the CPU: its dry run (``--dry-run``: ``pytest -m gpu tests/gpu`` with
``GPU_CHECK_DRY_RUN=1`` and ``python -m benchmarks gpu --device cpu --quick``) prints one table with a row per GPU test
and one for the benchmark and exits 0; a failing test and a benchmark past its timeout make it exit 1, with those rows
marked ``fail``; a bad argument exits 2. About 25 s on 2 idle cores, most of it the dry run's pytest.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
from pathlib import Path

from launching import launch_env
from paths import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
GPU_TESTS = ROOT / "tests" / "gpu"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=launch_env(**env), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def table(stdout: str) -> dict[str, list[str]]:
    """``{check: [result, seconds, key number]}`` of the one summary table."""
    assert stdout.count("## GPU check") == 1, stdout[-3000:]
    lines = stdout[stdout.index("## GPU check"):].splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("| ")]
    assert rows[0] == ["check", "result", "seconds", "key number"] and set(rows[1][0]) == {"-"}, rows[:2]
    return {r[0]: r[1:] for r in rows[2:]}


def gpu_test_names() -> dict[str, str]:
    """Every test function of tests/gpu, as the table names it: ``{row name: file stem}``."""
    names = {}
    for path in sorted(GPU_TESTS.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                name = node.name.removeprefix("test_").replace("_", " ")
                names[("multi-GPU: " if path.stem == "test_multi_gpu" else "") + name] = path.stem
    return names


def test_dry_run_prints_one_row_per_check_and_exits_0(tmp_path: Path) -> None:
    proc = run("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = table(proc.stdout)
    bench = [name for name in rows if name.startswith("benchmark: python -m benchmarks gpu")]
    assert len(bench) == 1 and rows[bench[0]][0] == "pass", rows
    assert re.fullmatch(r"[\d,]+ tokens/s, MFU n/a \(no peak FLOP/s for this device\)", rows[bench[0]][2]), rows
    expected = gpu_test_names()
    assert set(rows) - set(bench) == set(expected), sorted(rows)
    lora = "pass" if importlib.util.find_spec("peft") and importlib.util.find_spec("transformers") else "skip"
    for name, (result, seconds, key) in rows.items():
        float(seconds)
        if expected.get(name) == "test_multi_gpu":
            assert result == "skip" and "need >= 2 CUDA devices" in key, (name, result, key)
        elif name.startswith("float8"):
            assert result == "skip" and "compute capability >= 8.9" in key, (name, result, key)
        elif name.startswith("lora"):
            assert result == lora, (name, result, key)
        else:
            assert result == "pass" and key, (name, result, key)  # every passing test states its key number
    assert "(CPU: before sharding)" in rows["meta init through dtensor rng equals single device init"][2]
    passed = sum(r[0] == "pass" for r in rows.values())
    assert f"\n{passed} passed, 0 failed, {len(rows) - passed} skipped in " in proc.stdout
    assert (tmp_path / "pytest.xml").is_file() and (tmp_path / "bench.json").is_file()


def test_a_failing_test_and_a_timed_out_benchmark_exit_1(tmp_path: Path) -> None:
    """A plugin (given through ``PYTEST_ADDOPTS``) fails the one test selected; the benchmark gets 1 s."""
    (tmp_path / "forced_failure.py").write_text(
        "import pytest\n\n\n@pytest.hookimpl(tryfirst=True)\ndef pytest_runtest_call(item):\n"
        "    raise AssertionError('forced failure')\n")
    proc = run("--dry-run", "--out", str(tmp_path / "out"), "-k", "meta_init", PYTHONPATH=str(tmp_path),
               PYTEST_ADDOPTS="-p forced_failure", GPU_CHECK_BENCH_TIMEOUT="1")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = table(proc.stdout)
    assert rows["meta init through dtensor rng equals single device init"][0:1] == ["fail"], rows
    assert "forced failure" in rows["meta init through dtensor rng equals single device init"][2], rows
    assert rows["benchmark: python -m benchmarks gpu"][0] == "fail", rows
    assert rows["benchmark: python -m benchmarks gpu"][2].startswith("timed out after 1 s"), rows
    assert "\n0 passed, 2 failed, 0 skipped in " in proc.stdout


def test_an_unknown_argument_exits_2() -> None:
    proc = run("--no-such-option")
    assert proc.returncode == 2 and "unknown argument '--no-such-option'" in proc.stderr, proc.stderr
