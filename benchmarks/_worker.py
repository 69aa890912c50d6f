"""One benchmark rank: ``python -m benchmarks._worker SPEC.json OUT.json`` (started by ``_common.launch``)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main() -> None:
    import torch.distributed as dist

    spec_path, out_path = sys.argv[1], sys.argv[2]
    spec = json.loads(open(spec_path).read())
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    from benchmarks import activations, comm, grid, lora, throughput

    runners = {"comm": comm.measure, "activations": activations.measure, "vs_stock": throughput.measure_vs_stock,
               "efficiency": throughput.measure_efficiency, "lora": lora.measure,
               "grid_comm": grid.measure_comm, "grid_speed": grid.measure_speed}
    results: dict[str, Any] = {}
    for task in spec["tasks"]:
        options = dict(task)
        name = options.pop("task")
        start = time.perf_counter()
        results[name] = runners[name](**options)
        results[name]["wall_seconds"] = time.perf_counter() - start
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
