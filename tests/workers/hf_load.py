"""Load a Hugging Face checkpoint into a tensor-parallel Llama and measure each rank's memory while loading.

    torchrun --nproc-per-node N tests/workers/hf_load.py HF_DIR OUT.json

Each rank: build on meta, shard with the plan at tp=N, give the shards storage, then call
``load_hf_checkpoint`` while a thread samples the process's anonymous memory (``RssAnon``, every 0.2 ms): the
peak increase is the memory that loading allocated beyond the shards themselves. The kernel's peak RSS
(``VmHWM``, reset before the load) is reported too; it also counts the checkpoint's memory-mapped file pages.
Then the sharded model's logits are compared (rank 0) with transformers' model loaded whole.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_tp.checkpoint.hf import llama_from_hf, load_hf_checkpoint
    from lightning_tp.parallel.parallelize import apply_tensor_parallel
    from lightning_tp.parallel.plans import resolve_plan

    hf_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = llama_from_hf(hf_dir)  # meta
    apply_tensor_parallel(model, resolve_plan(model, "auto", sequence_parallel=True, loss_parallel=False), mesh)
    model.to_empty(device="cpu")
    model.init_weights()  # buffers (RoPE tables) and a defined starting point; the load overwrites the weights
    gc.collect()
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    before, anon_before = _status_kib("VmRSS"), _status_kib("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    anon_peak = [anon_before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon_peak[0] = max(anon_peak[0], _status_kib("RssAnon"))
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    load_hf_checkpoint(model, hf_dir)
    done.set()
    sampler.join()
    peak = _status_kib("VmHWM")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
    report = {"rank": dist.get_rank(), "anon_peak_bytes": (anon_peak[0] - anon_before) * 1024,
              "rss_peak_bytes": (peak - before) * 1024, "local_param_bytes": local_bytes}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        import transformers

        reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        with torch.no_grad():
            expected = reference(ids).logits
        sizes = [t.numel() * t.element_size() for t in reference.state_dict().values()]
        out.write_text(json.dumps({
            "ranks": reports, "full_bytes": sum(sizes), "largest_tensor_bytes": max(sizes),
            "logits_err": float((logits - expected).abs().max()),
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
