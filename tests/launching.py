"""What the tests that start jobs share: the environment a launch starts from, a Trainer whose launch is blocked,
the offline guard, a job watched in its own session, and the small corpus of the checkpoint and fault launches.

Imported by unit and multi-process tests alike (``tests/`` is on ``sys.path`` via ``conftest.py``); the fixtures
built on it (``clean_launch_environ``, ``no_spawn``) are in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

# ---------------------------------------------------------------------------------------------------- environment

LAUNCH_VARIABLES = frozenset({
    # torch.distributed and torchrun
    "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
    # Lightning: the node rank, the port its launcher picks, and what makes it detect a SLURM job
    "NODE_RANK", "STANDALONE_PORT", "SLURM_NTASKS", "SLURM_JOB_NAME",
})
"""Variables a launch sets or reads to find its place in a job: left over in the test process, they would make
Lightning (or torch) believe the ranks already exist, or join another job's."""
LAUNCH_PREFIXES = ("PL_", "TORCHELASTIC_", "LIGHTNING_TP_")
"""Lightning's (``PL_TRAINER_DEVICES``, ``PL_GLOBAL_SEED``, ...), torchelastic's, and this package's own
(``LIGHTNING_TP_FAILURE_DIR``, ``LIGHTNING_TP_MAX_CPU_PROCESSES``) variables."""


def is_launch_variable(name: str) -> bool:
    return name in LAUNCH_VARIABLES or name.startswith(LAUNCH_PREFIXES)


def launch_env(*, drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """The environment for a job started from a test: this process's, without the launch variables (and ``drop``),
    one thread per process (``OMP_NUM_THREADS=1``: the ranks share the cores), then ``extra``."""
    dropped = set(drop)
    env = {k: v for k, v in os.environ.items() if not is_launch_variable(k) and k not in dropped}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


QUIET = {"PYTHONWARNINGS": "ignore"}
"""For launches whose output is only kept for a failure message (``launch_env(**QUIET)``)."""


# ---------------------------------------------------------------------------------------------------- blocked launches


class SpawnBlocked(Exception):
    """Raised instead of starting the ranks (the ``no_spawn`` fixture of ``conftest.py``)."""


def cpu_trainer(root: Path, **kwargs: Any) -> Any:
    """A one-step Trainer, CPU unless told otherwise, without logger, checkpoints, progress bar or summary."""
    import lightning as L

    kwargs.setdefault("accelerator", "cpu")
    return L.Trainer(default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, max_steps=1, **kwargs)


# ---------------------------------------------------------------------------------------------------- offline guard

GUARD = '''"""Offline guard (tests/launching.py): refuse connections and lookups leaving this machine."""
import ipaddress
import os
import socket

_LOG = os.environ.get("OFFLINE_GUARD_LOG")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _local(host):
    if host is None or not isinstance(host, str):
        return host is None
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what, host):
    message = "offline guard: refused %s %r (pid %d)" % (what, host, os.getpid())
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(message + "\\n")
    raise OSError(message)


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse("a connection to", address[0])


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _local(host.decode() if isinstance(host, bytes) else host):
        _refuse("a name lookup of", host)
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''
"""``sitecustomize.py`` on ``PYTHONPATH``: every Python process of a launch (Lightning starts the ranks with the same
environment) can reach loopback addresses only. gloo and its store rendezvous on 127.0.0.1 (C++ sockets, which
this guard does not see; they stay on this machine). Refused attempts are logged to ``$OFFLINE_GUARD_LOG``."""

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def offline_env(folder: Path) -> dict[str, str]:
    """This process's environment without launch variables, with the offline guard and ``OMP_NUM_THREADS=1``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(GUARD)
    env = launch_env(**QUIET, **OFFLINE_ENV, OFFLINE_GUARD_LOG=str(folder / "refused.log"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH")) if p)
    return env


def refused(guard: Path) -> list[str]:
    """What the guard in ``guard`` refused, one line per attempt."""
    log = guard / "refused.log"
    return log.read_text().splitlines() if log.is_file() else []


# ---------------------------------------------------------------------------------------------------- watched jobs

ORPHAN_GRACE_S = 15.0
"""A process of the job still alive this long after the launching process exited is an orphan. (A SIGKILLed
process takes a moment to be torn down; ranks that fail on their own finish their exit a few seconds after.)"""
LAUNCH_LIMIT_S = 420


def session(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session, ...
            pids.append(int(entry.name))
    return pids


class Job:
    """A command in its own session; a thread records when it exits and which of its processes outlive it."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str], cwd: Optional[Path] = None) -> None:
        self.log = log
        self.started = time.time()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)
        self.ended: Optional[float] = None
        self.gone: Optional[float] = None
        self.survivors: list[int] = []
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        self.proc.wait()
        self.ended = time.time()
        while session(self.proc.pid) and time.time() < self.ended + ORPHAN_GRACE_S:
            time.sleep(0.1)
        self.gone = time.time()
        self.survivors = session(self.proc.pid)  # what outlives the launching process by ORPHAN_GRACE_S

    def finish(self, limit_s: float = LAUNCH_LIMIT_S) -> dict[str, Any]:
        """Wait for the job (at most ``limit_s`` from its start); on a timeout kill its whole session and fail."""
        self._watcher.join(timeout=max(1.0, self.started + limit_s - time.time()))
        if self._watcher.is_alive() or session(self.proc.pid):
            self.kill()
            pytest.fail(f"{self.log.name}: still running after {limit_s} s\n{self.tail()}")
        return {"rc": self.proc.returncode, "seconds": round(self.ended - self.started, 1), "ended": self.ended,
                "gone": self.gone, "survivors": self.survivors, "log": self.log.read_text(errors="replace")}

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in session(self.proc.pid):  # a rank that left the process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@contextlib.contextmanager
def fake_world(rank: int, world: int) -> Iterator[None]:
    """A fake process group for this process as ``rank`` of ``world`` (collectives are no-ops that keep shapes), so
    DTensor and FSDP2 compute real local shapes in one process; skips the test if a group already exists."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def launch_spec(worker: Path, tmp: Path, name: str, spec: dict) -> subprocess.Popen:
    """Start ``python WORKER OUT.json SPEC.json`` (the workers that run many cases in one launch), ``spec`` written to
    ``tmp/NAME.json``, output to ``tmp/NAME.out.json``, its log to ``tmp/NAME.log``; read it with
    :func:`worker_output`."""
    import json
    import sys

    (tmp / f"{name}.json").write_text(json.dumps(spec))
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, str(worker), str(tmp / f"{name}.out.json"), str(tmp / f"{name}.json")],
                            env=launch_env(**QUIET), stdout=log, stderr=subprocess.STDOUT)


def worker_output(proc: subprocess.Popen, out: Path, log: Path, what: str, timeout: float = 900) -> Any:
    """The JSON a launched worker wrote to ``out``, once ``proc`` has ended; the test fails with the end of ``log``
    if it exits non-zero, writes nothing or outlives ``timeout`` (then it is killed)."""
    import json

    try:
        rc: Any = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    if rc != 0 or not out.exists():
        pytest.fail(f"{what} exited with {rc}:\n{log.read_text()[-6000:]}")
    return json.loads(out.read_text())


def last_lines(log: str, n: int = 4) -> str:
    return "\n".join([line for line in log.splitlines() if line.strip()][-n:])


# ---------------------------------------------------------------------------------------------------- data


def write_corpus(path: Path) -> None:
    """60 lines of 12 words from a 12-word vocabulary, the same every time (about 230 training windows)."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "tensor", "shard", "mesh", "rank", "token", "loss", "step", "model"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)))  # ~230 windows
