"""Mutation checks: does the suite fail when the math or the safety breaks?

    python tests/mutations.py [--only NAME ...] [--list] [--markdown docs/mutations.md]

Each mutation is a named one-line bug. For each, the tracked files are copied to a temporary directory, the bug is
applied there (the line must occur exactly once, so a refactor that moves it makes the script fail loudly instead
of silently testing nothing), and the tests meant to catch it run against the copy (``PYTHONPATH`` = the copy, so
launched workers import the mutated package too). A mutation is *caught* when those tests fail, *survived* when
they pass. Without mutation the same selections pass (the control run, ``--control``).

Not part of the default test run: it runs several multi-process tests per mutation (about 30 minutes on 2 cores).
The last result is in docs/mutations.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    """pytest arguments selecting the tests meant to catch it"""


MP = "tests/multiprocess/test_parity.py"
CLIP = (MP, "-k", "clip")
MUTATIONS = [
    Mutation("clip-divisor-dropped", "the gradient norm counts replicated copies of a gradient once per copy",
             "lightning_tp/parallel/grad_norm.py", "total += local.double().abs().pow(norm_type).sum() / copies",
             "total += local.double().abs().pow(norm_type).sum()", CLIP),
    Mutation("per-mesh-norm-not-reduced", "a per-mesh norm is taken over each rank's local shards, not reduced",
             "lightning_tp/parallel/grad_norm.py", "norm = torch.nn.utils.get_total_norm(group, norm_type)",
             "norm = torch.nn.utils.get_total_norm([g.to_local() if isinstance(g, DTensor) else g for g in group],"
             " norm_type)", CLIP),
    Mutation("norm-all-reduce-removed", "the gradient norm's all-reduce over the world is skipped",
             "lightning_tp/parallel/grad_norm.py",
             "dist.all_reduce(total, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM)",
             "total = total  # all-reduce removed", CLIP),
    Mutation("clipping-skipped", "gradient_clip_val is accepted and ignored (norm clipping)",
             "lightning_tp/strategy/precision.py", "clip_grad_norm_(self._params(optimizer), clip_val)", "pass",
             CLIP),
    Mutation("clip-by-value-skipped", "gradient_clip_algorithm='value' is accepted and ignored",
             "lightning_tp/parallel/grad_norm.py", "_local(p.grad).clamp_(-clip_value, clip_value)",
             "_local(p.grad).clamp_(-float('inf'), float('inf'))",
             (MP, "-k", "value_clipping")),
    Mutation("o-proj-column-parallel", "attention's output projection sharded by columns instead of rows",
             "lightning_tp/parallel/families/llama.py",
             "    o = (RowwiseParallel(output_layouts=between) if heads is None\n"
             "         else HeadsRowwise(heads, output_layouts=between))",
             "    o = ColwiseParallel(output_layouts=between)",
             (MP, "-k", "loss_equals_single_process")),
    Mutation("loss-parallel-dropped-in-backward", "the vocab-parallel loss's backward runs outside loss_parallel()",
             "lightning_tp/strategy/strategy.py",
             "            with loss_parallel():\n                return super().backward(",
             "            with contextlib.nullcontext():\n                return super().backward(",
             (MP, "-k", "gradients_equal_single_process or loss_equals_single_process")),
    Mutation("sampler-ignores-saved-position", "a resumed data loader restarts its epoch from the beginning",
             "lightning_tp/data/samplers.py", "start = min(self.consumed, len(indices)) if self._resume else 0",
             "start = 0", ("tests/unit/data/test_data_pretrain.py", "-k", "resume")),
    Mutation("resume-skips-model-weights", "loading a sharded checkpoint restores everything but the weights",
             "lightning_tp/strategy/checkpoint_io.py", "        read(module_state)\n", "        pass\n",
             ("tests/multiprocess/test_checkpoint_launches.py", "-k", "resume or reshard", MP, "-k",
              "resumes_with_another")),
    Mutation("non-atomic-save", "the previous checkpoint is deleted before the new one is in place",
             "lightning_tp/checkpoint/layout.py", "        os.replace(path, old)\n", "        remove(path)\n",
             ("tests/unit/checkpoint/test_checkpoints.py", "-k", "publish")),
    Mutation("save-overwrites-user-files", "a save replaces a directory of the user's files",
             "lightning_tp/checkpoint/layout.py",
             "    if not (path.exists() or path.is_symlink()) or written_by_strategy(path):\n        return None",
             "    return None", ("tests/unit/strategy/test_contract.py", "-k", "save")),
]


def _copy_tree() -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    work = Path(tempfile.mkdtemp(prefix="lightning-tp-mutation-"))
    for rel in filter(None, files.stdout.split("\0")):
        src, dst = ROOT / rel, work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)
    return work


def _pytest_runs(selection: tuple[str, ...]) -> list[list[str]]:
    """Split ``(file, -k, expr, file, -k, expr)`` into one pytest command per file."""
    runs: list[list[str]] = []
    for token in selection:
        if token.endswith(".py") or "::" in token:
            runs.append([token])
        else:
            runs[-1].append(token)
    return runs


def run(mutation: Mutation | None, selection: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    work = _copy_tree()
    try:
        if mutation is not None:
            path = work / mutation.file
            text = path.read_text()
            count = text.count(mutation.old)
            if count != 1:
                raise SystemExit(f"{mutation.name}: the line to mutate occurs {count} times in {mutation.file};"
                                 " update the mutation")
            path.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1"}
        start, failed, tail = time.perf_counter(), False, ""
        for args in _pytest_runs(selection):
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
                                  cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
            lines = [line for line in proc.stdout.splitlines() if line.strip()]
            tail = lines[-1] if lines else proc.stderr[-300:]
            if proc.returncode == 5:
                raise SystemExit(f"{mutation.name if mutation else 'control'}: {args} selected no tests")
            if proc.returncode != 0:
                failed = True
                break
        outcome = ("caught" if failed else "survived") if mutation is not None else ("fails" if failed else "passes")
        return outcome, time.perf_counter() - start, tail
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--control", action="store_true", help="also run each selection without the mutation")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--markdown", type=Path, help="write the result table here")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        raise SystemExit(f"unknown mutation; choose from {[m.name for m in MUTATIONS]}")
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.what}")
        return 0
    rows = []
    for m in chosen:
        if args.control:
            outcome, seconds, tail = run(None, m.tests, args.timeout)
            print(f"control {m.name}: {outcome} in {seconds:.0f} s ({tail})", flush=True)
            if outcome != "passes":
                raise SystemExit(f"the tests for {m.name} fail without the mutation: {tail}")
        outcome, seconds, tail = run(m, m.tests, args.timeout)
        rows.append((m, outcome, seconds, tail))
        print(f"{m.name}: {outcome} in {seconds:.0f} s ({tail})", flush=True)
    caught = sum(outcome == "caught" for _, outcome, _, _ in rows)
    print(f"\n{caught} of {len(rows)} mutations caught")
    if args.markdown:
        lines = ["| mutation | the bug | tests run | result | time |", "|---|---|---|---|---|"]
        lines += [f"| `{m.name}` | {m.what} | `{' '.join(m.tests)}` | {outcome} ({tail}) | {seconds:.0f} s |"
                  for m, outcome, seconds, tail in rows]
        args.markdown.write_text("\n".join(lines) + f"\n\n{caught} of {len(rows)} caught.\n")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
