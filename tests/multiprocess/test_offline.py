"""Offline running (issue 7): ``lightning-tp pretrain`` (shortened, world 2) and the fast tests that touch what could
reach for the network, each run as a job with every Python socket behind the offline guard of ``tests/launching.py``.
The fault launches check the same of themselves (``tests/multiprocess/test_reliability_launches.py``); the guard's
positive control is ``tests/unit/test_reliability.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launching import Job, last_lines, offline_env, refused
from paths import ROOT

pytestmark = pytest.mark.multiprocess


def _no_network_namespace() -> list[str]:
    """A command prefix that runs in a new network namespace with only loopback up (``unshare -rn``, no root
    needed where user namespaces are allowed): C++ sockets (gloo, the store) cannot leave the machine either.
    ``[]`` where that is not available."""
    prefix = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    if not (shutil.which("unshare") and shutil.which("ip")):
        return []
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", "import socket; socket.getaddrinfo('localhost', 1)"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return prefix if probe.returncode == 0 else []


def _cli() -> list[str]:
    script = shutil.which("lightning-tp")
    return [script] if script else [sys.executable, "-c", "from lightning_tp.cli import main; main()"]


def test_the_main_job_runs_with_the_network_blocked(tmp_path: Path) -> None:
    """``lightning-tp pretrain`` on its embedded corpus, shortened, 2 processes, every Python socket guarded, and
    inside a network namespace with only loopback where the machine allows one."""
    overrides = ["model=debug", "trainer=cpu", "trainer.devices=2", "strategy.tensor_parallel_size=2",
                 "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
                 "data.seq_len=32", "data.batch_size=2", "data.max_bytes=100000",
                 f"data.cache_dir={tmp_path / 'cache'}", "sample_tokens=2", "logger=csv", f"out_dir={tmp_path / 'out'}"]
    namespace = _no_network_namespace()
    job = Job([*namespace, *_cli(), "pretrain", *overrides], tmp_path / "pretrain.log",
              offline_env(tmp_path / "guard"), cwd=tmp_path)
    result = job.finish()
    print(f"\nmain job offline in {result['seconds']} s ({'network namespace + ' if namespace else ''}Python guard)")
    assert result["rc"] == 0, job.tail()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2
    assert (tmp_path / "out" / "last" / "meta.pt").is_file()
    assert refused(tmp_path / "guard") == []


def test_fast_tests_pass_with_the_network_blocked(tmp_path: Path) -> None:
    """The fast tests that touch what could reach for the network (transformers, safetensors and tokenizer files,
    checkpoint reading and conversion) run under the guard."""
    files = ["tests/unit/checkpoint/test_hf_interop.py", "tests/unit/checkpoint/test_checkpoints.py"]
    job = Job([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not multiprocess", "-p", "no:cacheprovider",
               *files], tmp_path / "pytest.log", offline_env(tmp_path / "guard"), cwd=ROOT)
    result = job.finish()
    assert result["rc"] == 0, job.tail()
    assert " passed" in last_lines(result["log"], 1) and refused(tmp_path / "guard") == []
