"""Models the user parallelizes in ``configure_model`` train under ``TensorParallelStrategy`` (``plan="auto"`` and
``plan=None``) exactly as under Lightning's ``ModelParallelStrategy``, and the launching process's environment is
what Lightning's own launch leaves. One 4-rank launch (dp=2 × tp=2): ``tests/workers/user_parallel.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import QUIET, launch_env
from paths import WORKERS

pytestmark = pytest.mark.multiprocess

WORKER = WORKERS / "user_parallel.py"
# What Lightning's script launcher itself puts in the launching process's environment (so that later Trainer calls
# in the same script join the ranks it started instead of starting new ones); nothing else may appear.
LIGHTNING_LAUNCH_KEYS = {"MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("user_parallel")
    out = tmp / "out.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=launch_env(**QUIET), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(4)]
    records[0]["stdout"] = proc.stdout + proc.stderr
    return records


@pytest.mark.parametrize("model", ["ffn", "llama"])
@pytest.mark.parametrize("mode", ["auto", "none"])
def test_losses_equal_the_parents(ranks: list[dict], model: str, mode: str) -> None:
    for record in ranks:
        ours, parents = record["runs"][f"{model}/{mode}"], record["runs"][f"{model}/parent"]
        assert len(ours["losses"]) == len(parents["losses"]) == 4
        for a, b in zip(ours["losses"], parents["losses"], strict=True):
            assert abs(a - b) <= 1e-6 * abs(b), (model, mode, record["rank"], ours["losses"], parents["losses"])
        # the user's own sharding, not a second one: the same DTensor parameters as under the parent
        assert ours["dtensor_params"] == parents["dtensor_params"] > 0
    # the two data-parallel replicas saw different batches: the comparison is over both
    assert ranks[0]["runs"][f"{model}/parent"]["losses"] != ranks[2]["runs"][f"{model}/parent"]["losses"]


def test_the_strategy_says_it_found_a_user_parallelized_model(ranks: list[dict]) -> None:
    assert "configure_model() parallelized the model itself" in ranks[0]["stdout"]


def test_the_launching_process_environment_is_what_lightning_leaves(ranks: list[dict]) -> None:
    environ = ranks[0]["environ"]
    launch = environ["launch"]
    added = set(launch["after"]) - set(launch["before"])
    assert added <= LIGHTNING_LAUNCH_KEYS, added - LIGHTNING_LAUNCH_KEYS
    assert not set(launch["before"]) - set(launch["after"])
    assert environ["after fit"] == environ["fit"]
    for call in ("validate", "test", "predict"):
        assert environ[f"after {call}"] == environ[f"before {call}"] == environ["fit"], call
