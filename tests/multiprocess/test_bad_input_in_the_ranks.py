"""The bad input a user can give that only the ranks see (the row ``rank-sequence-length-own-dataloader`` of
docs/errors.md): a real 2-rank job whose every rank raises the same typed error, and which ends as a whole. The
inputs caught in the launching process, before any rank exists, are ``tests/unit/test_bad_inputs.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from launching import launch_env

pytestmark = pytest.mark.multiprocess

LIMIT_S = 60.0
"""The bad-input matrix's limit (tests/unit/test_bad_inputs.py): the job has ended this soon after it started."""
RANK_ONLY_SCRIPT = textwrap.dedent("""
    import time

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_tp import TensorParallelStrategy
    from lightning_tp.training.module import CausalLMModule

    if __name__ == "__main__":
        print(f"FIT_STARTS_AT {time.time()}", flush=True)  # after the imports, which are not the input's fault
        ids = torch.randint(0, 256, (8, 7))  # 7 tokens: not divisible by tp=2, visible only in a batch
        data = DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=2)
        trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            strategy=TensorParallelStrategy(tensor_parallel_size=2))
        trainer.fit(CausalLMModule("debug"), data)
""")


def test_bad_input_seen_only_inside_the_ranks_ends_the_whole_job(tmp_path: Path) -> None:
    """A batch of the user's own DataLoader whose length the TP ranks cannot split exists only in the ranks: every
    rank raises the same typed error at its first forward, and the job (launcher and spawned rank) ends, within
    the limit, rather than one rank waiting in a collective for another that died."""
    script = tmp_path / "rank_only.py"
    script.write_text(RANK_ONLY_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    ended = time.time()
    leftovers = True
    for _ in range(50):  # the spawned rank shares the session's process group; it must be gone too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            leftovers = False
            break
        time.sleep(0.1)
    if leftovers:
        os.killpg(proc.pid, 9)
    assert not leftovers, "a rank outlived the failed job"
    assert proc.returncode != 0, out[-3000:]
    started = [float(line.split()[1]) for line in out.splitlines() if line.startswith("FIT_STARTS_AT")]
    assert started, out[-3000:]  # the launching process prints it first, then the rank it re-runs the script for
    assert ended - min(started) < LIMIT_S, f"the job ended {ended - min(started):.1f} s after the launch"
    assert "SequenceLengthError" in out and "Sequence length 7 is not divisible by tensor_parallel_size=2" in out, \
        out[-3000:]
    assert "Fix: pad or pack sequences to a multiple of 2" in out
