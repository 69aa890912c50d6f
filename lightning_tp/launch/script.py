"""The default launcher: re-run the script for ranks 1..N-1, after the preflight checks; no rank
outlives a failure.

Failing ranks record their error (:func:`record_failure`) for the launching process, whose error
then names the rank that failed first.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from typing_extensions import override

from lightning_tp._compat import (
    ChildProcessObserver,
    SubprocessScriptLauncher,
    set_num_threads_if_needed,
)
from lightning_tp.launch.preflight import LaunchedStrategy, check_launch, check_model

if TYPE_CHECKING:
    import lightning.pytorch as pl


__all__ = ["EXIT_WAIT_S", "FAILURES_ENV", "ScriptLauncher", "preflight", "record_failure"]


def preflight(strategy: LaunchedStrategy, trainer: Optional[pl.Trainer]) -> None:
    # CPU process count, rendezvous port: before any rank exists to wait on them
    check_launch(strategy)
    if trainer is not None and trainer.lightning_module is not None:
        check_model(strategy, trainer.lightning_module)


EXIT_WAIT_S = 1.0
"""How long rank 0, failing, waits for the ranks it started to exit on their own before it kills
them."""
FAILURES_ENV = "LIGHTNING_TP_FAILURE_DIR"
"""Set by the launching process for the ranks it starts: where a failing rank records its error."""


class _Observer(ChildProcessObserver):
    """Lightning's observer (every 5 s: a child that died makes it SIGKILL every rank), which can be
    stood down once the launching process is handling a failure itself, so that it does not kill
    that process mid-report."""

    def __init__(self, child_processes: list[Any]) -> None:
        super().__init__(main_pid=os.getpid(), child_processes=child_processes)
        self.stood_down = threading.Event()

    @override
    def _run(self) -> bool:
        return self.stood_down.is_set() or super()._run()


class ScriptLauncher(SubprocessScriptLauncher):
    """Lightning's script launcher (re-runs ``sys.argv`` for ranks 1..N-1), with the preflight
    checks first.

    When a rank fails, no rank outlives the job. A rank started here that fails exits (and records
    its error with :func:`record_failure` when the strategy reports it); when the launching process
    (rank 0) then fails too (typically a collective that lost its peer, or the strategy's
    ``timeout`` for a rank that hangs), it kills the ranks still running and adds the first failure
    (another rank's recorded error, exit code or death by a signal) to its own error as a note, so
    the last lines the user reads point at the original. Lightning's observer (which SIGKILLs every
    rank, rank 0 included, within 5 s of a rank dying) still covers a rank 0 that is blocked rather
    than failing.
    """

    def __init__(self, strategy: LaunchedStrategy, *args: Any) -> None:
        super().__init__(*args)
        self._strategy = strategy

    @override
    def launch(self, function: Any, *args: Any, trainer: Optional[pl.Trainer] = None,
               **kwargs: Any) -> Any:
        preflight(self._strategy, trainer)
        # Lightning's launch, holding on to the observer and a folder for the ranks' failure
        # records.
        self.cluster_environment.validate_settings(num_devices=self.num_processes,
                                                   num_nodes=self.num_nodes)
        observer, folder = None, None
        if not self.cluster_environment.creates_processes_externally:
            folder = tempfile.mkdtemp(prefix="lightning_tp-failures-")
            # ranks run later fits in this folder too
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            # Only the ranks started here need the folder: it is in the environment they copy, not
            # left in ours.
            previous = os.environ.get(FAILURES_ENV)
            os.environ[FAILURES_ENV] = folder
            try:
                self._call_children_scripts()
            finally:
                if previous is None:
                    del os.environ[FAILURES_ENV]
                else:
                    os.environ[FAILURES_ENV] = previous
            observer = _Observer(self.procs)
            observer.start()
        set_num_threads_if_needed(num_processes=self.num_processes)
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if observer is not None:
                observer.stood_down.set()
                self._stop_children(error, Path(folder))  # type: ignore[arg-type]
            raise

    def _stop_children(self, error: BaseException, folder: Path) -> None:
        """Kill the ranks still running; note the failure that came first if it was not this
        rank's."""
        failed_at = time.time()
        # A rank whose sockets closed (what made this rank's collective fail) may not be reaped yet:
        # a moment to exit. The ranks blocked on this one would not exit in it: this process still
        # holds its connections.
        deadline = time.monotonic() + EXIT_WAIT_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        exited = [proc.poll() for proc in self.procs]  # before this process kills anyone
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        first_rank = self.cluster_environment.node_rank() * self.num_processes + 1
        ended = [f"rank {first_rank + i} (pid {self.procs[i].pid}) "
                 + (f"was killed by {signal.Signals(-code).name}" if code < 0
                    else f"exited with code {code}")
                 for i, code in enumerate(exited) if code]
        ended_note = None
        if ended:
            ended_note = (f"lightning-tp: {', '.join(ended)} before this rank failed; this rank's"
                          " error is likely a consequence.")
            if any(code and code > 0 for code in exited):
                ended_note += (" The first error is printed above, its lines prefixed with that"
                               " rank.")
        # A rank killed by a signal could not record its error, and the errors the others recorded
        # (lost peers) are consequences of its death: then the exits are the story. Otherwise the
        # earliest recorded error is.
        if any(code is not None and code < 0 for code in exited):
            note = ended_note
        else:
            note = (_first_failure(folder, failed_at, f"{type(error).__name__}: {error}")
                    or ended_note)
        # e.g. after a timeout: ranks that never answered
        if note is None and any(code is None for code in exited):
            running = [f"rank {first_rank + i} (pid {proc.pid})"
                       for i, proc in enumerate(self.procs) if exited[i] is None]
            note = ("lightning-tp: killed the ranks still running when this rank failed:"
                    f" {', '.join(running)}.")
        if note is not None:
            # Python >= 3.11: printed under the traceback's last line
            if hasattr(error, "add_note"):
                error.add_note(note)
            elif error.args and isinstance(error.args[0], str):
                error.args = (f"{error.args[0]}\n{note}", *error.args[1:])


def _first_failure(folder: Path, before: float, own: str) -> Optional[str]:
    """The earliest failure another rank recorded with :func:`record_failure` before ``before``, as
    a note."""
    records = []
    for file in folder.glob("rank*.json"):
        try:
            records.append(json.loads(file.read_text()))
        except (OSError, ValueError):
            continue
    records = [r for r in records if r["time"] <= before and r["error"] != own]
    if not records:
        return None
    first = min(records, key=lambda r: r["time"])
    return (f"lightning-tp: rank {first['rank']} failed first, {before - first['time']:.1f} s"
            f" earlier: {first['error']}")


def record_failure(rank: int, error: BaseException) -> None:
    """On a rank started by :class:`ScriptLauncher`, write ``{"rank", "time", "error"}`` for the
    launching process (a no-op elsewhere). Meant for ``Strategy.on_exception``, which Lightning
    calls on every rank that fails."""
    folder = os.environ.get(FAILURES_ENV)
    if not folder:
        return
    record = {"rank": rank, "time": time.time(), "error": f"{type(error).__name__}: {error}"[:2000]}
    try:
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(record))
    except OSError:  # the launching process already finished and removed the folder
        pass
