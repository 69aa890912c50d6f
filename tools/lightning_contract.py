"""Run Lightning's own ``ModelParallelStrategy`` tests against ``TensorParallelStrategy``: the parent's contract.

    python tools/lightning_contract.py --lightning-src PATH [--mode parent|auto|none|all] [--integration] [-k EXPR]

``PATH`` is a checkout (or ``git archive``) of Lightning-AI/pytorch-lightning at the tag matching the installed
``lightning``. Nothing of Lightning's is copied into this repository: the tests are copied into a temporary
directory, the class the test modules import as ``ModelParallelStrategy`` is replaced by

* ``parent``: Lightning's own class (the baseline),
* ``auto``: ``TensorParallelStrategy`` (the default ``plan="auto"``),
* ``none``: ``TensorParallelStrategy(plan=None)`` (the user parallelizes in ``configure_model``),

and pytest runs them. ``--integration`` also runs a CPU port of ``test_model_parallel_integration.py``: the only
edits are ``accelerator="cuda"|"gpu"|"auto"`` → ``"cpu"``, the expected device type ``"cuda"`` → ``"cpu"``, the
``min_cuda_gpus``/``standalone``/``bf16_cuda`` requirements dropped, and ``strategy="ddp"`` kept as it is.
Multi-device cases launch real gloo processes (Lightning re-runs the same pytest command for the other ranks), one
pytest process per test, so the integration run takes several minutes per mode on 2 cores.

Prints one table per mode (passed / failed / skipped, and each test's outcome) and exits non-zero if a test
that passes with the parent fails with a substituted class, except those listed in ``DELIBERATE`` (each a
documented difference, see README "Differences from ModelParallelStrategy").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

UNIT = "tests/tests_pytorch/strategies/test_model_parallel.py"
INTEGRATION = "tests/tests_pytorch/strategies/test_model_parallel_integration.py"
SUPPORT = ("tests/tests_pytorch/__init__.py", "tests/tests_pytorch/conftest.py", "tests/tests_pytorch/helpers")

# Tests that fail with the subclass by design, per mode, with the reason (kept in sync with the README's list).
_SAFE_SAVES = ("a save onto an existing file, or a directory that is not a complete checkpoint written by this"
               " strategy, is refused with CheckpointPathError (a FileExistsError) and nothing is touched; the parent"
               " deletes the file, or writes beside the user's files, or deletes a directory holding only meta.pt")
DELIBERATE = {
    ("auto", "test_save_checkpoint_path_exists"): _SAFE_SAVES,
    ("none", "test_save_checkpoint_path_exists"): _SAFE_SAVES,
    **{("auto", name): "plan='auto' refuses a model it does not recognise and that configure_model() did not"
       " parallelize (ModelNotRecognisedError, naming plan=None) instead of training it unsharded; plan=None keeps"
       " the parent's behaviour and passes this test"
       for name in ("test_meta_device_materialization", "test_setup_device_mesh",
                    "test_model_parallel_single_file_checkpoint_with_compile")},
}

_SUBSTITUTE = '''
import json
import os

import pytest

# Ranks that Lightning starts re-run this pytest command: only the launching process reports outcomes.
_REPORT = None if "LOCAL_RANK" in os.environ else os.environ.get("LIGHTNING_TP_CONTRACT_REPORT")


def pytest_runtest_logreport(report):
    if _REPORT and (report.when == "call" or report.outcome != "passed"):
        name = report.nodeid.split("::")[-1]
        with open(_REPORT, "a") as f:
            f.write(json.dumps({"name": name, "outcome": report.outcome}) + "\\n")


@pytest.fixture(autouse=True)
def _substitute_strategy(request, monkeypatch):
    mode = os.environ.get("LIGHTNING_TP_CONTRACT_MODE", "parent")
    if mode == "parent" or not hasattr(request.module, "ModelParallelStrategy"):
        yield
        return
    from lightning_tp import TensorParallelStrategy

    # Named like the parent: Lightning's messages interpolate `type(self).__name__`, and the tests match them.
    class ModelParallelStrategy(TensorParallelStrategy):
        def __init__(self, *args, **kwargs):
            if mode == "none":
                kwargs.setdefault("plan", None)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(request.module, "ModelParallelStrategy", ModelParallelStrategy)
    yield
'''


def _port_integration(text: str) -> str:
    text = re.sub(r'accelerator="(cuda|gpu|auto)"', 'accelerator="cpu"', text)
    text = text.replace('"accelerator": "cuda"', '"accelerator": "cpu"')
    text = text.replace('== "cuda"', '== "cpu"').replace('torch.device("cuda", self.local_rank)', 'torch.device("cpu")')
    text = re.sub(r",\s*min_cuda_gpus=\d+", "", text)
    text = re.sub(r"min_cuda_gpus=\d+,\s*", "", text)
    text = re.sub(r",\s*standalone=True", "", text)
    text = re.sub(r"standalone=True,\s*", "", text)
    text = text.replace("RunIf(bf16_cuda=True)", "RunIf()")
    return text


def prepare(src: Path, integration: bool) -> Path:
    work = Path(tempfile.mkdtemp(prefix="lightning-contract-"))
    for rel in (UNIT, *SUPPORT) + ((INTEGRATION,) if integration else ()):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        if (src / rel).is_dir():
            shutil.copytree(src / rel, work / rel)
        else:
            shutil.copy(src / rel, work / rel)
    (work / "tests/tests_pytorch/strategies/__init__.py").touch()
    conftest = work / "tests/tests_pytorch/strategies/conftest.py"
    conftest.write_text(_SUBSTITUTE)
    if integration:
        path = work / INTEGRATION
        path.write_text(_port_integration(path.read_text()))
    return work


def run(work: Path, mode: str, files: list[str], extra: list[str], timeout: float) -> dict[str, str]:
    report = work / f"report-{mode}.jsonl"
    env = {**os.environ, "LIGHTNING_TP_CONTRACT_MODE": mode, "LIGHTNING_TP_CONTRACT_REPORT": str(report),
           "PYTHONPATH": str(work / "tests")}
    env.pop("LOCAL_RANK", None)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rN"]
    for file in files:
        if file.endswith("_integration.py"):
            # One process per test, as Lightning runs its standalone tests: the ranks a Trainer starts re-run the
            # whole pytest command, so two multi-device tests in one command would start two sets of ranks.
            listed = subprocess.run([*base, "--collect-only", file, *extra], cwd=work / "tests", env=env,
                                    capture_output=True, text=True, check=False).stdout
            for node in (line for line in listed.splitlines() if "::" in line):
                print(f"-- {mode}: {node}", flush=True)
                try:
                    subprocess.run([*base, node], cwd=work / "tests", env=env, check=False, timeout=timeout)
                except subprocess.TimeoutExpired:
                    with open(report, "a") as f:
                        f.write(json.dumps({"name": node.split("::")[-1], "outcome": "failed"}) + "\n")
        else:
            subprocess.run([*base, file, *extra], cwd=work / "tests", env=env, check=False)
    outcomes: dict[str, str] = {}
    for line in report.read_text().splitlines() if report.exists() else []:
        record = json.loads(line)
        if outcomes.get(record["name"]) != "failed":  # a failed setup, call or teardown fails the test
            outcomes[record["name"]] = record["outcome"]
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lightning-src", type=Path, required=True)
    parser.add_argument("--mode", choices=("parent", "auto", "none", "all"), default="all")
    parser.add_argument("--integration", action="store_true")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per integration test")
    args, extra = parser.parse_known_args(argv)
    work = prepare(args.lightning_src.resolve(), args.integration)
    files = [UNIT.removeprefix("tests/")] + ([INTEGRATION.removeprefix("tests/")] if args.integration else [])
    modes = ("parent", "auto", "none") if args.mode == "all" else (args.mode,)
    results = {mode: run(work, mode, files, extra, args.timeout) for mode in modes}
    regressions = []
    for mode, outcomes in results.items():
        counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
        print(f"\n== {mode}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
        for name, outcome in sorted(outcomes.items()):
            base = results.get("parent", {}).get(name)
            note = ""
            if mode != "parent" and base == "passed" and outcome != "passed":
                reason = DELIBERATE.get((mode, name.split("[")[0]))
                note = f"  deliberate: {reason}" if reason else "  REGRESSION"
                if not reason:
                    regressions.append(f"{mode}: {name}")
            print(f"   {outcome:8s} {name}{note}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    if regressions:
        print("\nregressions against the parent:\n  " + "\n  ".join(regressions))
    return 1 if regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
