"""Reliability (issue 7) across real launches: no hangs, killed workers, interrupted saves, determinism, offline.

The tests share seven launches of ``tests/workers/faults.py`` (gloo, CPU, the debug Llama, a 60-line corpus, global
batch 4, checkpoints every 3 steps), each in its own session under a time limit (the whole session is SIGKILLed if
it is exceeded, so CI cannot hang), each with the network blocked by the offline guard of ``tests/launching.py``:

* ``raise``, world 2, (dp, tp) = (1, 2): ``training_step`` of rank 1 raises at step 2; ``raise0``: the same on
  rank 0, the launching process;
* ``bad_record``, world 2, (2, 1): the training sample data-parallel rank 1 reads first at step 2 is malformed;
* ``stuck``, world 2, (1, 2): rank 1 hangs after step 2 (started first and left to run beside the next launches:
  it waits for the collective timeout, ``STUCK_TIMEOUT_S``);
* ``kill9``, world 4, (2, 2): this test SIGKILLs rank 1 after step 7 (last checkpoint: step 6);
* ``save_kill``, world 4, (2, 2): rank 2 SIGKILLs itself in the middle of the step-6 save, after writing its shard
  to the staging directory (last checkpoint: step 3);
* ``resume``, world 4: ``ref`` (2, 2) trains 12 steps uninterrupted; ``kill9`` and ``save_kill`` are resumed from
  their ``last`` to step 12; the first 3 steps are trained again at (4, 1) and (1, 4) for the data order.

``lightning-tp pretrain`` and a fast test subset with the network blocked are ``tests/multiprocess/test_offline.py``;
the single-process parts of issue 7 (the guard's positive control, safe loading, the launcher's clean-up) are
``tests/unit/test_reliability.py``. What the checkpoint tests already cover (failures raised inside a save on one or
all ranks, a swap interrupted between its renames, incomplete directories, a pickle with foreign globals in
``.metadata``) is not repeated here: see ``tests/multiprocess/test_checkpoint_launches.py``,
``tests/unit/checkpoint/test_checkpoints.py`` and ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from launching import LAUNCH_LIMIT_S, ORPHAN_GRACE_S, Job, last_lines, offline_env, refused, write_corpus
from paths import WORKERS

pytestmark = pytest.mark.multiprocess

WORKER = WORKERS / "faults.py"
CRASH_TIMEOUT_S = 300
"""Collective timeout of the launches where a rank crashes or is killed: far above their exit times, so it is not
what ends them."""
STUCK_TIMEOUT_S = 30
"""Collective timeout of the launch where a rank hangs: what ends it. It also bounds the rendezvous (rank 0 waits
that long for the other ranks to start), so it is not much shorter."""
EXIT_BOUND_S = 30.0
"""A crashed or killed rank: every process of the job has exited within this many seconds."""
EVERY, KILL_STEP, SAVE_KILL_STEP, TOTAL_STEPS = 3, 7, 6, 12
RESUME_RTOL = 1e-6
LAYOUT_RTOL = 1e-5
"""Same samples at another (dp, tp): equal losses up to the order of reductions."""


# ---------------------------------------------------------------------------------------------------- launching


def _start(root: Path, name: str, devices: int, timeout_s: int, runs: list[dict]) -> Job:
    spec = {"root": str(root), "corpus": str(root / "corpus.txt"), "devices": devices, "timeout_s": timeout_s,
            "runs": runs}
    (root / f"{name}.json").write_text(json.dumps(spec))
    return Job([sys.executable, str(WORKER), str(root / f"{name}.json")], root / f"{name}.log",
               offline_env(root / "guard"))


def _wait_for(path: Path, job: Job, limit_s: float) -> None:
    deadline = time.time() + limit_s
    while not path.exists():
        if job.proc.poll() is not None or time.time() > deadline:
            job.kill()
            pytest.fail(f"{path} never appeared\n{job.tail()}")
        time.sleep(0.05)


def _fault_time(root: Path, run: str) -> float:
    return float((root / run / "fault").read_text())


def read_steps(folder: Path) -> dict[int, dict[int, dict]]:
    """``{rank: {step: line}}`` from the ``rank<r>.jsonl`` files the worker writes."""
    ranks = {}
    for file in sorted(folder.glob("rank*.jsonl")):
        lines = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        ranks[int(file.stem[4:])] = {line["step"]: line for line in lines}
    return ranks


def global_losses(folder: Path) -> dict[int, float]:
    """Mean over the data-parallel ranks of each step's loss (equal token counts, no masked labels)."""
    by_step: dict[int, dict[int, float]] = {}
    for lines in read_steps(folder).values():
        for step, line in lines.items():
            by_step.setdefault(step, {})[line["dp_rank"]] = line["loss"]
    return {step: sum(v.values()) / len(v) for step, v in sorted(by_step.items())}


def global_batches(folder: Path) -> dict[int, list[list[int]]]:
    """Each step's global batch in sampler order (dp rank r holds positions r, r + dp, ...), checking on the way
    that the tensor-parallel ranks of a data-parallel group read identical tokens."""
    per_dp: dict[int, dict[int, list]] = {}
    for rank, lines in read_steps(folder).items():
        for step, line in lines.items():
            seen = per_dp.setdefault(step, {}).setdefault(line["dp_rank"], line["ids"])
            assert seen == line["ids"], f"{folder.name}: rank {rank} read other tokens than its dp group at {step}"
    out = {}
    for step, groups in per_dp.items():
        dp = len(groups)
        out[step] = [groups[r][k] for k in range(len(groups[0])) for r in range(dp)]
    return out


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path / "meta.pt", map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reliability")
    write_corpus(root / "corpus.txt")
    start = time.perf_counter()
    results: dict[str, Any] = {"root": root}

    # A hung rank waits out the collective timeout: started first, it waits beside the next three launches.
    stuck = _start(root, "stuck", 2, STUCK_TIMEOUT_S, [
        {"name": "stuck", "dp": 1, "tp": 2, "max_steps": 5, "fault": {"kind": "pause", "rank": 1, "step": 2}}])
    for name, dp, tp, kind, rank in (("raise", 1, 2, "raise", 1), ("raise0", 1, 2, "raise", 0),
                                     ("bad_record", 2, 1, "bad_record", 1)):
        job = _start(root, name, 2, CRASH_TIMEOUT_S, [
            {"name": name, "dp": dp, "tp": tp, "max_steps": 5, "fault": {"kind": kind, "rank": rank, "step": 2}}])
        results[name] = {**job.finish(), "fault": _fault_time(root, name)}
    results["stuck"] = {**stuck.finish(), "fault": _fault_time(root, "stuck")}

    # kill -9 of rank 1 once it has finished step 7 (it then hangs, so the kill lands at a known step).
    kill9 = _start(root, "kill9", 4, CRASH_TIMEOUT_S, [
        {"name": "kill9", "dp": 2, "tp": 2, "max_steps": TOTAL_STEPS, "every": EVERY,
         "fault": {"kind": "pause", "rank": 1, "step": KILL_STEP}}])
    _wait_for(root / "kill9" / "fault", kill9, LAUNCH_LIMIT_S)
    victim = int((root / "kill9" / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    results["kill9"] = {**kill9.finish(), "fault": killed_at, "victim": victim}

    save_kill = _start(root, "save_kill", 4, CRASH_TIMEOUT_S, [
        {"name": "save_kill", "dp": 2, "tp": 2, "max_steps": TOTAL_STEPS, "every": EVERY,
         "fault": {"kind": "kill_in_save", "rank": 2, "step": SAVE_KILL_STEP}}])
    results["save_kill"] = {**save_kill.finish(), "fault": _fault_time(root, "save_kill")}
    last = root / "save_kill" / "last"
    results["after_save_kill"] = {
        "siblings": sorted(p.name for p in last.parent.iterdir() if p.is_dir()),
        "staged": sorted(p.name for p in last.parent.glob("last.tmp-*/*")),
        "last_step": _checkpoint_step(last) if (last / "meta.pt").is_file() else None,
    }
    results["kill9"]["last_step"] = _checkpoint_step(root / "kill9" / "last")

    resume = _start(root, "resume", 4, CRASH_TIMEOUT_S, [
        {"name": "ref", "dp": 2, "tp": 2, "max_steps": TOTAL_STEPS},
        {"name": "kill9_resumed", "dp": 2, "tp": 2, "max_steps": TOTAL_STEPS, "ckpt": "kill9/last"},
        {"name": "save_kill_resumed", "dp": 2, "tp": 2, "max_steps": TOTAL_STEPS, "ckpt": "save_kill/last"},
        {"name": "order_4x1", "dp": 4, "tp": 1, "max_steps": 3},
        {"name": "order_1x4", "dp": 1, "tp": 4, "max_steps": 3},
    ])
    results["resume"] = resume.finish()
    if results["resume"]["rc"] != 0:
        pytest.fail(f"resume launch failed:\n{resume.tail()}")
    results["after_resume_siblings"] = sorted(p.name for p in last.parent.iterdir() if p.is_dir())
    results["refused"] = refused(root / "guard")
    results["seconds"] = round(time.perf_counter() - start, 1)
    _summary(results)
    return results


def _summary(results: dict[str, Any]) -> None:
    lines = [f"\nreliability launches: {results['seconds']} s"]
    for name in ("raise", "raise0", "bad_record", "stuck", "kill9", "save_kill"):
        r = results[name]
        lines.append(f"  {name:10s} launch {r['seconds']:5.1f} s, rc={r['rc']}, fault -> launching rank exited"
                     f" {r['ended'] - r['fault']:.1f} s, -> every rank exited {r['gone'] - r['fault']:.1f} s,"
                     f" orphans {r['survivors']}")
    lines.append(f"  resume     launch {results['resume']['seconds']:5.1f} s")
    lines.append(f"  kill9: killed after step {KILL_STEP}, last = step {results['kill9']['last_step']};"
                 f" save_kill: killed during the step-{SAVE_KILL_STEP} save, last = step"
                 f" {results['after_save_kill']['last_step']}")
    root = results["root"]
    ref = global_losses(root / "ref")

    def worst(name: str) -> float:
        """Largest relative difference of a run's global losses from the uninterrupted run's, over its steps."""
        losses = global_losses(root / name)
        return max(abs(loss - ref[step]) / abs(ref[step]) for step, loss in losses.items())

    lines.append(f"  resumed vs uninterrupted, worst relative loss difference (allowed {RESUME_RTOL:g}):"
                 f" kill9 {worst('kill9_resumed'):.1e}, save_kill {worst('save_kill_resumed'):.1e}")
    lines.append(f"  same data at other layouts vs (2, 2), worst relative loss difference (allowed {LAYOUT_RTOL:g}):"
                 f" (4, 1) {worst('order_4x1'):.1e}, (1, 4) {worst('order_1x4'):.1e}")
    print("\n".join(lines))
    (root / "summary.txt").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------------- 2. no hangs


def _assert_ended(result: dict[str, Any], bound_s: float) -> None:
    assert result["rc"] != 0, "the job reported success"
    assert result["survivors"] == [], f"processes outlived the launching rank: {result['survivors']}"
    assert result["gone"] - result["ended"] < ORPHAN_GRACE_S
    assert result["gone"] - result["fault"] <= bound_s, (result["gone"] - result["fault"], result["log"][-3000:])


def test_an_exception_on_one_rank_ends_every_rank_with_that_error(jobs: dict) -> None:
    result = jobs["raise"]
    _assert_ended(result, EXIT_BOUND_S)
    assert "RuntimeError: injected fault: rank 1 failed in training_step at step 2" in result["log"]
    # the last lines (rank 0's error, a consequence) point at the original one
    # (rank 1 recorded its error through the strategy's on_exception; the launching rank quotes it)
    last = last_lines(result["log"])
    assert "lightning-tp: rank 1 failed first" in last, last
    assert "injected fault: rank 1 failed in training_step" in last, last
    errors = {f.name: f.read_text() for f in (jobs["root"] / "raise").glob("*.error")}
    assert errors["rank1.error"].startswith("RuntimeError: injected fault")


def test_an_exception_on_the_launching_rank_ends_the_ranks_it_started(jobs: dict) -> None:
    """Rank 0 raises: its own error is the original and the last thing printed; the rank it started, blocked in a
    collective with it, is killed rather than left to find out."""
    result = jobs["raise0"]
    _assert_ended(result, EXIT_BOUND_S)
    last = last_lines(result["log"], 2)
    assert "RuntimeError: injected fault: rank 0 failed in training_step at step 2" in last, last
    assert "lightning-tp: killed the ranks still running when this rank failed: rank 1" in last, last


def test_a_bad_record_seen_by_one_rank_ends_every_rank_with_its_error(jobs: dict) -> None:
    result = jobs["bad_record"]
    _assert_ended(result, EXIT_BOUND_S)
    errors = {f.name: f.read_text() for f in (jobs["root"] / "bad_record").glob("*.error")}
    # only data-parallel rank 1 read the sample: it alone raised DataError; rank 0 lost its peer
    assert errors["rank1.error"].startswith("DataError: injected fault: training sample"), errors
    assert "DataError" not in errors.get("rank0.error", ""), errors
    last = last_lines(result["log"])
    assert "lightning-tp: rank 1 failed first" in last and "DataError: injected fault: training sample" in last, last


def test_a_hung_rank_is_ended_by_the_collective_timeout(jobs: dict) -> None:
    result = jobs["stuck"]
    waited = result["ended"] - result["fault"]
    assert STUCK_TIMEOUT_S - 1 <= waited <= STUCK_TIMEOUT_S + EXIT_BOUND_S, waited
    _assert_ended(result, STUCK_TIMEOUT_S + EXIT_BOUND_S)  # the hung rank itself was killed, not left behind
    assert "lightning-tp: killed the ranks still running when this rank failed: rank 1" in result["log"]


# ---------------------------------------------------------------------------------------------------- 3. kill -9


def test_kill_9_of_a_worker_ends_the_job_and_resume_loses_only_the_last_interval(jobs: dict) -> None:
    result, root = jobs["kill9"], jobs["root"]
    _assert_ended(result, EXIT_BOUND_S)
    # rank 0 names the killed rank, or Lightning's observer (polling every 5 s) got there first and says so
    assert (f"rank 1 (pid {result['victim']}) was killed by SIGKILL" in result["log"]
            or f"Child process with PID {result['victim']} terminated with code -9" in result["log"]), \
        last_lines(result["log"])
    killed = read_steps(root / "kill9")
    assert max(killed[1]) == KILL_STEP
    last_step = result["last_step"]
    assert last_step == KILL_STEP // EVERY * EVERY and KILL_STEP - last_step <= EVERY  # steps lost: 7 - 6 = 1
    ref, resumed, original = (global_losses(root / n) for n in ("ref", "kill9_resumed", "kill9"))
    assert sorted(resumed) == list(range(last_step + 1, TOTAL_STEPS + 1))
    for step, loss in resumed.items():  # the same as an uninterrupted run, and as the run that was killed
        assert loss == pytest.approx(ref[step], rel=RESUME_RTOL, abs=0), (step, loss, ref[step])
        if step in original:
            assert loss == pytest.approx(original[step], rel=RESUME_RTOL, abs=0), (step, loss, original[step])
    assert len({round(v, 4) for v in ref.values()}) == TOTAL_STEPS  # the losses move: a replayed step would show


# ------------------------------------------------------------------------------------------------ 4. interrupted save


def test_a_worker_killed_inside_a_save_leaves_last_complete_and_resumable(jobs: dict) -> None:
    result, root, after = jobs["save_kill"], jobs["root"], jobs["after_save_kill"]
    _assert_ended(result, EXIT_BOUND_S)
    # rank 0 reports rank 2's death, or Lightning's observer (which polls every 5 s) kills every rank first, saying so
    assert re.search(r"rank:? 2\b.*(SIGKILL|code -9)", last_lines(result["log"])), last_lines(result["log"])
    # the staging directory of the step-6 save holds the dead rank's shard but is not a checkpoint; last is step 3
    assert after["siblings"] == ["last", f"last.tmp-{SAVE_KILL_STEP}"], after
    assert "meta.pt" not in after["staged"] and ".metadata" not in after["staged"], after
    assert after["last_step"] == SAVE_KILL_STEP - EVERY
    # resuming recovers (removes the staging leftovers) and continues exactly
    assert jobs["after_resume_siblings"] == ["last"]
    ref, resumed = global_losses(root / "ref"), global_losses(root / "save_kill_resumed")
    assert sorted(resumed) == list(range(SAVE_KILL_STEP - EVERY + 1, TOTAL_STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(ref[step], rel=RESUME_RTOL, abs=0), (step, loss, ref[step])


# ---------------------------------------------------------------------------------------------------- 5. determinism


def test_same_seed_and_config_give_identical_losses(jobs: dict) -> None:
    """Three separate launches of the same configuration: bit-identical per-rank losses on CPU, step for step."""
    root = jobs["root"]
    ref = read_steps(root / "ref")
    for other in ("kill9", "save_kill"):
        run = read_steps(root / other)
        for rank, steps in run.items():
            common = sorted(set(steps) & set(ref[rank]))
            assert len(common) >= SAVE_KILL_STEP - 1, (other, rank, sorted(steps))
            assert [steps[s]["loss"] for s in common] == [ref[rank][s]["loss"] for s in common], (other, rank)
            assert [steps[s]["ids"] for s in common] == [ref[rank][s]["ids"] for s in common], (other, rank)


def test_the_global_batch_sequence_is_the_same_for_every_layout(jobs: dict) -> None:
    """(dp, tp) = (2, 2), (4, 1), (1, 4) with the same global batch read the same samples in the same order, and
    the tensor-parallel ranks of a data-parallel group read identical tokens (checked in ``global_batches``)."""
    root = jobs["root"]
    ref = global_batches(root / "ref")
    for layout in ("order_4x1", "order_1x4"):
        batches = global_batches(root / layout)
        assert sorted(batches) == [1, 2, 3]
        for step, batch in batches.items():
            assert len(batch) == 4 and batch == ref[step], (layout, step)
        losses, ref_losses = global_losses(root / layout), global_losses(root / "ref")
        for step in (1, 2, 3):  # the same data, so the same loss up to reduction order
            assert losses[step] == pytest.approx(ref_losses[step], rel=LAYOUT_RTOL), (layout, step)
    assert len({tuple(map(tuple, b)) for b in ref.values()}) == TOTAL_STEPS  # the batches do differ per step


# ---------------------------------------------------------------------------------------------------- 6. offline


def test_fault_launches_ran_offline_without_trying_the_network(jobs: dict) -> None:
    assert jobs["refused"] == []
