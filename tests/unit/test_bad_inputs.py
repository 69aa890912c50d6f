"""The bad-input matrix: every mistake a user can make with a mesh, a model, a plan, the precision, data files,
tokenizers, checkpoints, Hydra overrides or the machine, driven through the entry point a user calls
(the ``lightning-tp pretrain|finetune`` recipe's :func:`~lightning_tp.recipes.run.run` on a composed config,
``Trainer(strategy=TensorParallelStrategy(...)).fit``, ``lightning-tp consolidate|export|import``).

For each case: the error's type, that its message names the input (value, key or path) and says the fix, that it
comes within 60 s, and that it comes from the launching process before any worker exists: spawning a rank, a
subprocess or a process group raises :class:`Spawned` (a ``BaseException``, so no ``except Exception`` swallows
it), which ``test_a_valid_job_reaches_the_spawn_guard`` shows happens for a good input. docs/errors.md lists the
cases; ``test_every_case_is_in_the_docs_table`` keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from paths import ROOT
from torch.distributed.tensor.parallel import ColwiseParallel
from user_files import user_dir, user_file

from lightning_tp import TensorParallelStrategy, cli
from lightning_tp.data.tokenizers import TokenizerError
from lightning_tp.errors import (
    CheckpointError,
    CheckpointPathError,
    ConfigureModelRequiredError,
    DataError,
    EnvironmentConfigError,
    MeshConfigError,
    ModelShapeError,
    PlanError,
    SequenceLengthError,
    UnsupportedFeatureError,
)
from lightning_tp.models import Llama, get_config
from lightning_tp.recipes.config import RecipeConfigError, compose_recipe
from lightning_tp.recipes.run import run
from lightning_tp.training.module import CausalLMModule

DOCS = ROOT / "docs" / "errors.md"
LIMIT_S = 60.0


class Spawned(BaseException):
    """A worker process, subprocess or process group was about to start."""


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch: pytest.MonkeyPatch, clean_launch_environ: None) -> None:
    """Fail the test if anything starts a rank: the launcher's children, any subprocess, fork workers, or a
    process group (which rank 0 of a script launch would open right after spawning); no launch variable is set
    (``clean_launch_environ``, ``tests/conftest.py``)."""

    def refuse(what: str) -> Callable[..., Any]:
        def start(*args: Any, **kwargs: Any) -> Any:
            raise Spawned(f"{what} was called: a worker was started before the error")
        return start

    monkeypatch.setattr(_SubprocessScriptLauncher, "_call_children_scripts", refuse("the launcher's spawn"))
    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
    monkeypatch.setattr(torch.multiprocessing, "start_processes", refuse("torch.multiprocessing.start_processes"))
    monkeypatch.setattr(torch.distributed, "init_process_group", refuse("init_process_group"))


# ---------------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good inputs shared by the cases (each case damages its own copy): a corpus, instructions, a sharded
    checkpoint and a Hugging Face directory of the debug Llama, and a word-level tokenizer of 600 tokens."""
    import torch.distributed.checkpoint as dcp
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from lightning_tp.checkpoint.hf import export_hf

    root = tmp_path_factory.mktemp("good")
    corpus = root / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 100)
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps({"instruction": f"Repeat {w}", "output": w}) + "\n"
                               for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")))
    config = get_config("debug")
    torch.manual_seed(0)
    llama = Llama(config)
    llama.init_weights(seed=0)
    sharded = root / "sharded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": {f"model.{k}": v for k, v in llama.state_dict().items()}},
                 checkpoint_id=str(sharded), no_dist=True)
    torch.save({"hyper_parameters": {"model": dataclasses.asdict(config)}}, sharded / "meta.pt")
    hf = root / "hf"
    export_hf(llama.state_dict(), config, hf)
    words = root / "words"
    words.mkdir()
    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(598)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(words / "tokenizer.json"))
    (words / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return {"corpus": corpus, "records": records, "sharded": sharded, "hf": hf, "words": words}


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / src.name
    shutil.copytree(src, dst)
    return dst


def _recipe(recipe: str, tmp: Path, files: dict[str, Path], *overrides: str) -> Callable[[], Any]:
    """What ``lightning-tp RECIPE overrides...`` does, in this process: compose, then :func:`run` (4 CPU ranks,
    the debug Llama, tp=4)."""
    base = ["model=debug", "trainer=cpu", "logger=none", f"out_dir={tmp / 'out'}", "sample_tokens=1", "data.seq_len=32"]
    if recipe == "pretrain":
        base += [f"data.path={files['corpus']}", f"data.cache_dir={tmp / 'cache'}"]
    else:  # eight short instructions, so that data preparation is instant
        base += ["data=alpaca", f"data.path={files['records']}", "data.template=plain", "data.seq_len=64"]

    def go() -> Any:
        cfg = compose_recipe(recipe, [*base, *overrides])
        return run(cfg, checkpoint=cfg.get("checkpoint"))
    return go


def _fit(strategy: Callable[[], TensorParallelStrategy], model: Callable[[], L.LightningModule] | None = None,
         devices: int = 4, **trainer: Any) -> Callable[[], Any]:
    """``Trainer(strategy=TensorParallelStrategy(...)).fit(module, data)``, as a user script does."""
    def go() -> Any:
        t = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy(), max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer)
        data = torch.utils.data.DataLoader(torch.randint(0, 256, (8, 33)), batch_size=2)
        return t.fit((model or (lambda: CausalLMModule("debug")))(), data)
    return go


def _cli(*argv: str) -> Callable[[], Any]:
    return lambda: cli.main([str(a) for a in argv])


def _llama(**fields: Any) -> Callable[[], CausalLMModule]:
    return lambda: CausalLMModule(dataclasses.replace(get_config("debug"), **fields))


@dataclasses.dataclass
class Case:
    id: str
    category: str
    build: Callable[[Path, dict[str, Path]], tuple[Callable[[], Any], list[str]]]
    """(tmp, good files) → (the action, fragments its message must contain: the input and the fix)"""
    error: type[BaseException]
    cause: type[BaseException] | None = None
    """For a command-line tool that exits: the typed error it exits from."""


def _tokenizer_too_big(tmp: Path, f: dict[str, Path]):
    return _recipe("pretrain", tmp, f, f"data.tokenizer={f['words']}"), ["600 tokens", "vocab_size is 512",
                                                                        "model.vocab_size=600"]


def _tokenizer_no_eos(tmp: Path, f: dict[str, Path]):
    words = _copy(f["words"], tmp)
    (words / "tokenizer_config.json").unlink()
    return (_recipe("pretrain", tmp, f, f"data.tokenizer={words}", "model.vocab_size=600"),
            [str(words / "tokenizer.json"), "no EOS token", "Fix: name it in tokenizer_config.json"])


def _tokenizer_malformed(tmp: Path, f: dict[str, Path]):
    bad = tmp / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    return _recipe("pretrain", tmp, f, f"data.tokenizer={bad}"), [str(bad), "Fix: pass a tokenizer.json"]


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _ckpt_truncated(tmp: Path, f: dict[str, Path]):
    ckpt = _copy(f["sharded"], tmp)
    _truncate(ckpt / "__0_0.distcp")
    return (_recipe("finetune", tmp, f, f"checkpoint={ckpt}"),
            [str(ckpt / "__0_0.distcp"), "bytes but the metadata needs", "Fix: copy it again"])


def _ckpt_shard_missing(tmp: Path, f: dict[str, Path]):
    ckpt = _copy(f["sharded"], tmp)
    (ckpt / "__0_0.distcp").unlink()
    return (_recipe("finetune", tmp, f, f"checkpoint={ckpt}"),
            [str(ckpt / "__0_0.distcp"), "is missing", "Fix: copy it again"])


def _ckpt_incomplete(tmp: Path, f: dict[str, Path]):
    ckpt = _copy(f["sharded"], tmp)
    (ckpt / "meta.pt").unlink()
    return _recipe("finetune", tmp, f, f"checkpoint={ckpt}"), [str(ckpt), "no meta.pt", "Resume from a complete"]


def _ckpt_other_model(tmp: Path, f: dict[str, Path]):
    import torch.distributed.checkpoint as dcp

    other = tmp / "other"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": torch.nn.Linear(4, 4).state_dict()}, checkpoint_id=str(other), no_dist=True)
    torch.save({"hyper_parameters": {}}, other / "meta.pt")
    return (_recipe("finetune", tmp, f, f"checkpoint={other}"),
            [str(other), "21 of the model's 21 tensors are not in it", "'weight'",
             "Fix: build the model it was trained with"])


def _ckpt_other_depth(tmp: Path, f: dict[str, Path]):
    return (_recipe("finetune", tmp, f, f"checkpoint={f['sharded']}", "model.num_hidden_layers=3"),
            [str(f["sharded"]), "model.model.layers.2.input_layernorm.weight", "'num_hidden_layers': 2",
             "Fix: build the model it was trained with"])


def _ckpt_other_shape(tmp: Path, f: dict[str, Path]):
    return (_recipe("finetune", tmp, f, f"checkpoint={f['sharded']}", "model.intermediate_size=128"),
            [str(f["sharded"]), "mlp.gate_proj.weight: model (128, 64) vs checkpoint (192, 64)",
             "'intermediate_size': 192", "Fix: build the model it was trained with"])


def _hf_other_model(tmp: Path, f: dict[str, Path]):
    hf = _copy(f["hf"], tmp)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    return (_recipe("finetune", tmp, f, f"checkpoint={hf}"),
            ["model_type='gpt2'", "only Llama", "Fix: pass a Llama-family"])


def _hf_truncated(tmp: Path, f: dict[str, Path]):
    hf = _copy(f["hf"], tmp)
    _truncate(hf / "model.safetensors", 0.7)
    return _recipe("finetune", tmp, f, f"checkpoint={hf}"), ["model.safetensors", str(hf), "truncated", "Fix:"]


def _hf_other_shape(tmp: Path, f: dict[str, Path]):
    hf = _copy(f["hf"], tmp)  # weights of the debug Llama, config.json of a wider MLP
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    return (_recipe("finetune", tmp, f, f"checkpoint={hf}"),
            [str(hf), "model.layers.0.mlp.up_proj.weight: model (256, 64) vs checkpoint (192, 64)", "Fix: load it"])


def _resume_truncated(tmp: Path, f: dict[str, Path]):
    ckpt = _copy(f["sharded"], tmp)
    _truncate(ckpt / "__0_0.distcp")
    return _recipe("pretrain", tmp, f, f"resume={ckpt}"), [str(ckpt / "__0_0.distcp"), "Fix: copy it again"]


def _adapters_only(tmp: Path, f: dict[str, Path], rank: int = 16) -> Path:
    """A LoRA run's training checkpoint as the recipe sees it: DCP shards of adapters only, and ``meta.pt`` with the
    strategy's layout (``adapters_only``; the PEFT config, trained on the sharded base)."""
    import torch.distributed.checkpoint as dcp

    path = tmp / f"lora-r{rank}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": {"model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight":
                                 torch.zeros(rank, 64)}}, checkpoint_id=str(path), no_dist=True)
    config = {"r": rank, "lora_alpha": 32, "base_model_name_or_path": str(f["sharded"].resolve()),
              "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}
    torch.save({"lightning_tp": {"format": 1, "adapters_only": True, "peft": {"model": {"default": config}}},
                "hyper_parameters": {"model": "debug"}}, path / "meta.pt")
    return path


def _lora_from_adapters_only(tmp: Path, f: dict[str, Path]):
    ckpt = _adapters_only(tmp, f)
    return (_recipe("finetune", tmp, f, "peft=lora", f"checkpoint={ckpt}"),
            [f"checkpoint={str(ckpt)!r} holds LoRA adapters only", f"checkpoint={f['sharded'].resolve()}",
             f"resume={str(ckpt)!r}"])


def _lora_resume_other_rank(tmp: Path, f: dict[str, Path]):
    ckpt = _adapters_only(tmp, f, rank=8)
    return (_recipe("finetune", tmp, f, "peft=lora", f"checkpoint={f['sharded']}", f"resume={ckpt}"),
            [f"resume={str(ckpt)!r}", "peft.rank=8 there, 16 here", "Fix: set those keys"])


def _lora_without_peft(tmp: Path, f: dict[str, Path]):
    action = _recipe("finetune", tmp, f, "peft=lora")

    def go() -> Any:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
            return action()
    return go, ["peft=lora needs PEFT", 'pip install "lightning-tp[lora]"', "peft=none"]


def _port_in_use(entry: str) -> Callable[[Path, dict[str, Path]], tuple[Callable[[], Any], list[str]]]:
    def build(tmp: Path, f: dict[str, Path]):
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        action = _recipe("pretrain", tmp, f) if entry == "recipe" else _fit(lambda: TensorParallelStrategy())

        def go() -> Any:
            with pytest.MonkeyPatch.context() as mp, holder:
                mp.setenv("MASTER_PORT", str(port))
                return action()
        return go, [f"MASTER_PORT={port}", "already in use", "Fix: unset MASTER_PORT"]
    return build


def _more_gpus_than_exist(tmp: Path, f: dict[str, Path]):
    action = _recipe("pretrain", tmp, f, "trainer=gpu", "trainer.devices=8", "strategy.tensor_parallel_size=8")

    def go() -> Any:  # a machine with 2 GPUs, whatever this one has
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.cuda, "is_available", lambda: True)
            mp.setattr(torch.cuda, "device_count", lambda: 2)
            return action()
    return go, ["trainer.devices=8", "asks for 8 GPUs", "2 visible CUDA device(s)", "Fix: set trainer.devices"]


def _gpu_on_cpu_machine(tmp: Path, f: dict[str, Path]):
    action = _recipe("pretrain", tmp, f, "trainer=gpu", "trainer.devices=2")

    def go() -> Any:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.cuda, "device_count", lambda: 0)
            return action()
    return go, ["accelerator='gpu'", "none is visible", "Fix: set accelerator='cpu'"]


def _export_wrong_model(tmp: Path, f: dict[str, Path]):
    return (_cli("export", f["sharded"], tmp / "hf_out", "--model", "small"),
            ["--model 'small'", "Leave --model out"])


def _attention_keeping_head_counts() -> CausalLMModule:
    """9 query and 3 KV heads (uneven at tp 4), and attention modules that keep ``num_heads`` as an attribute, as
    many hand-written attentions do: on a rank computing 3 or 2 of the heads that number is wrong."""
    module = CausalLMModule(dataclasses.replace(get_config("debug"), hidden_size=72, num_attention_heads=9,
                                                num_key_value_heads=3, head_dim=8))
    for layer in module.model.model.layers:
        layer.self_attn.num_heads = 9
    return module


class _Transformers(L.LightningModule):
    """A user's module around a tiny transformers model built in ``__init__``."""

    def __init__(self, family: str) -> None:
        super().__init__()
        import transformers

        small = dict(vocab_size=128, intermediate_size=32, num_hidden_layers=1, pad_token_id=0, eos_token_id=1,
                     bos_token_id=1)
        if family == "phi3":  # a fused gate_up_proj of 2 x 30 rows, which tp 4 cannot split into gate/up pairs
            self.model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
                **{**small, "intermediate_size": 30}, hidden_size=32, num_attention_heads=8, num_key_value_heads=2))
        else:  # StableLM: Llama-shaped, but no family and no tp plan to derive one from
            self.model = transformers.StableLmForCausalLM(transformers.StableLmConfig(
                **small, hidden_size=32, num_attention_heads=4, num_key_value_heads=4))


class _NoHook(L.LightningModule):
    """A module that is not a Llama and has no ``configure_model``: nothing would parallelize it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)


def _gguf_onto_user_dir(tmp: Path, f: dict[str, Path]) -> tuple[Callable[[], Any], list[str]]:
    """``lightning-tp from-gguf`` into a directory of the user's files: refused before the file is read."""
    (tmp / "m.gguf").write_bytes(b"GGUF")  # never read: the output check comes first
    out = user_dir(tmp)
    return _cli("from-gguf", tmp / "m.gguf", out), [str(out), "exists and is not empty", "--overwrite"]


def _save_onto(make: Callable[[Path], Path]) -> Callable[[Path, dict[str, Path]], Any]:
    """``trainer.save_checkpoint(path)`` reaches ``strategy.save_checkpoint``: onto a path the user's files hold."""
    def build(tmp: Path, f: dict[str, Path]):
        path = make(tmp)

        def go() -> Any:
            strategy = TensorParallelStrategy()
            strategy.model, strategy.parallel_devices = torch.nn.Linear(2, 2), [torch.device("cpu")]
            strategy._data_parallel_size = strategy._tensor_parallel_size = 1
            strategy._device_mesh = type("Mesh", (), {"__getitem__": lambda self, k: type(
                "Dim", (), {"size": lambda self: 1})()})()
            strategy.save_checkpoint({"state_dict": {}, "global_step": 1}, path)
        return go, [str(path), "nothing was touched", "Fix: save to another path"]
    return build


def R(recipe: str, overrides: list[str], expect: list[str]) -> Callable[[Path, dict[str, Path]], Any]:
    """A recipe case; ``{tmp}`` and the names of :func:`files` in overrides and fragments are filled in."""
    def build(tmp: Path, f: dict[str, Path]):
        fill = {"tmp": tmp, **f}
        return (_recipe(recipe, tmp, f, *(o.format(**fill) for o in overrides)),
                [e.format(**fill) for e in expect])
    return build


def F(action: Callable[[], Any], expect: list[str]) -> Callable[[Path, dict[str, Path]], Any]:
    return lambda tmp, f: (action, expect)


def W(write: Callable[[Path], Path], recipe: str, key: str, expect: list[str], *more: str):
    """A recipe case reading the file ``write(tmp)`` makes, through ``key``; ``{path}`` in fragments is that file."""
    def build(tmp: Path, f: dict[str, Path]):
        path = write(tmp)
        return (_recipe(recipe, tmp, f, f"{key}={path}", *more), [e.format(path=path) for e in expect])
    return build


def _text(name: str, content: str) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        (tmp / name).write_text(content)
        return tmp / name
    return write


CASES = [
    # ------------------------------------------------------------------ mesh sizes
    Case("mesh-product-not-world", "mesh", F(_fit(lambda: TensorParallelStrategy(tensor_parallel_size=3)),
         ["tensor_parallel_size (3)", "world size 4", "Fix: choose sizes whose product is 4"]), MeshConfigError),
    Case("mesh-size-not-int", "mesh", F(_fit(lambda: TensorParallelStrategy(tensor_parallel_size="two")),
         ["`tensor_parallel_size` must be 'auto' or a positive int, got 'two'"]), MeshConfigError),
    Case("mesh-fsdp-off-with-dp", "mesh", F(_fit(lambda: TensorParallelStrategy(data_parallel_size=2, fsdp=False)),
         ["`fsdp=False` needs `data_parallel_size=1` (got 2)", "set fsdp=True"]), MeshConfigError),
    Case("mesh-recipe-tp-3-of-4", "mesh", R("pretrain", ["strategy.tensor_parallel_size=3"],
         ["tensor_parallel_size (3)", "world size 4", "Fix: choose sizes"]), MeshConfigError),
    # ------------------------------------------------------------------ 2D tensor parallelism (docs/2d.md)
    Case("grid-malformed", "mesh", F(_fit(lambda: TensorParallelStrategy(tensor_parallel_size=(2, 2, 2))),
         ["(2, 2, 2)", "two positive ints (rows, columns)", "tensor_parallel_size=(2, 2)"]), MeshConfigError),
    Case("grid-with-unsupported-mode", "mesh", F(_fit(lambda: TensorParallelStrategy(
         tensor_parallel_size=(2, 2), activation_checkpointing="selective")),
         ["(2, 2)", "activation_checkpointing='selective'", "or pass an int tensor_parallel_size for 1D"]),
         MeshConfigError),
    Case("grid-kv-heads-not-divisible", "model/plan", F(_fit(lambda: TensorParallelStrategy(
         tensor_parallel_size=(2, 2)), _llama(num_key_value_heads=2)),
         ["num_key_value_heads=2", "r·c = 4 of tensor_parallel_size=(2, 2)", "a grid whose r·c divides 2, or 1D"]),
         PlanError),
    Case("grid-recipe-seq-len", "model/plan", R("pretrain", ["strategy.tensor_parallel_size=[2,2]",
         "data.seq_len=31"], ["data.seq_len=31", "the rows of tensor_parallel_size=[2, 2]",
                              "a multiple of 2"]), SequenceLengthError),
    # ------------------------------------------------------------------ model and plan shapes
    Case("shape-heads-not-divisible", "model/plan", R("pretrain", ["model.num_attention_heads=2",
         "model.num_key_value_heads=2"], ["num_attention_heads=2", "tensor_parallel_size=4",
                                          "choose a tensor_parallel_size of at most 2"]), ModelShapeError),
    Case("shape-tp-over-query-heads", "model/plan", F(_fit(lambda: TensorParallelStrategy(), _llama(
         num_attention_heads=2, num_key_value_heads=1, head_dim=32)),
         ["num_attention_heads=2", "tensor_parallel_size=4", "at least one whole query head"]), ModelShapeError),
    Case("shape-attention-keeps-head-counts", "model/plan", F(_fit(lambda: TensorParallelStrategy(),
         _attention_keeping_head_counts), ["model.model.layers.0.self_attn and 1 more (LlamaAttention)",
                                           "9 query and 3 KV heads", "it keeps num_heads=9",
                                           "divides both 9 and 3 (1, 3)"]), ModelShapeError),
    Case("shape-fused-projection-cannot-split", "model/plan", F(_fit(lambda: TensorParallelStrategy(),
         lambda: _Transformers("phi3")), ["intermediate_size=30", "mlp.gate_up_proj and mlp.down_proj",
                                          "tensor_parallel_size=4", "divides 30"]), ModelShapeError),
    Case("plan-structure-no-rule-fits", "model/plan", F(_fit(lambda: TensorParallelStrategy(),
         lambda: _Transformers("stablelm")), ["StableLmForCausalLM", "Pass `plan=` a dict"]), PlanError),
    Case("shape-intermediate-not-divisible", "model/plan", F(_fit(lambda: TensorParallelStrategy(), _llama(
         intermediate_size=190)), ["intermediate_size=190", "divides 190"]), ModelShapeError),
    Case("shape-vocab-leaves-a-rank-empty", "model/plan", F(_fit(lambda: TensorParallelStrategy(
         tensor_parallel_size=4), _llama(vocab_size=3)), ["vocab_size=3", "1 of the tensor_parallel_size=4 ranks",
         "such as 3"]), ModelShapeError),
    Case("shape-seq-len-under-sp", "model/plan", R("pretrain", ["data.seq_len=30"],
         ["data.seq_len=30", "tensor_parallel_size=4", "Fix: set data.seq_len to a multiple of 4"]),
         SequenceLengthError),
    Case("plan-unknown-name", "model/plan", F(_fit(lambda: TensorParallelStrategy(plan="lama")),
         ["Unknown plan 'lama'", "Did you mean 'llama'?"]), PlanError),
    Case("plan-pattern-matches-nothing", "model/plan", F(_fit(lambda: TensorParallelStrategy(
         plan={"model.model.layers.*.self_attn.q": ColwiseParallel()})),
         ["'model.model.layers.*.self_attn.q' matches no module", "Near misses",
          "self_attn.q_proj"]), PlanError),
    Case("plan-none-without-configure-model", "model/plan", F(_fit(lambda: TensorParallelStrategy(plan=None),
         _NoHook), ["plan=None", "required to override the `configure_model()` hook", "Fix: add configure_model()"]),
         ConfigureModelRequiredError),
    Case("plan-auto-unrecognised-without-configure-model", "model/plan", F(_fit(lambda: TensorParallelStrategy(),
         _NoHook), ["found no model it recognises in _NoHook", "pass plan=None", "configure_model()"]),
         ConfigureModelRequiredError),
    Case("plan-none-with-activation-checkpointing", "model/plan", F(_fit(lambda: TensorParallelStrategy(
         plan=None, activation_checkpointing="full")), ["activation_checkpointing='full'", "plan=None",
         "Fix: leave them at their defaults"]), UnsupportedFeatureError),
    Case("lora-target-matches-nothing", "model/plan", R("finetune", ["peft=lora", "peft.target_modules=[q_proj,qproj]"],
         ["peft.target_modules: 'qproj'", "matches no module", "did you mean 'q_proj'", "Fix: name projections"]),
         RecipeConfigError),
    Case("lora-target-not-a-projection", "model/plan", R("finetune", [
         "peft=lora", "peft.target_modules=[q_proj,input_layernorm]"],
         ["'input_layernorm' (a RMSNorm)", "remove 'input_layernorm' from peft.target_modules"]), PlanError),
    Case("lora-target-plan-cannot-shard", "model/plan", R("finetune", [
         "peft=lora", "peft.target_modules=[q_proj,lm_head]"],
         ["peft.target_modules=['q_proj', 'lm_head']", "lm_head", "remove 'lm_head' from peft.target_modules"]),
         PlanError),
    Case("lora-rank-wider-than-module", "model/plan", R("finetune", ["peft=lora", "peft.rank=48"],
         ["peft.rank=48 is larger than k_proj (64 in, 32 out)", "Fix: peft.rank=32 or less"]), RecipeConfigError),
    Case("model-config-invalid", "model/plan", R("pretrain", ["model.hidden_size=60"],
         ["`hidden_size`=60", "set `head_dim` explicitly or change one of them"]), ValueError),
    # ------------------------------------------------------------------ precision
    Case("precision-unsupported-trainer", "precision", F(_fit(lambda: TensorParallelStrategy(), precision="64-true"),
         ["precision='64-true'", "Choose a different precision among: 32-true, bf16-mixed"]), ValueError),
    Case("precision-unknown-recipe", "precision", R("pretrain", ["trainer.precision=bf17"],
         ["'bf17'", "Allowed precision values"]), ValueError),
    # ------------------------------------------------------------------ data files
    Case("data-pretrain-missing", "data", R("pretrain", ["data.path={tmp}/nope.txt"],
         ["{tmp}/nope.txt", "Fix"]), DataError),
    Case("data-pretrain-empty", "data", W(_text("empty.txt", ""), "pretrain", "data.path",
         ["{path}", "is empty", "Fix: point `path` at files with text"]), DataError),
    Case("data-pretrain-too-short", "data", W(_text("short.txt", "print(1)\n"), "pretrain", "data.path",
         ["too short", "seq_len + 1 = 33", "Fix: add text, lower seq_len (now 32)"]), DataError),
    Case("data-pretrain-seq-len-zero", "data", R("pretrain", ["data.seq_len=0"],
         ["seq_len=0", "Fix: pass a positive number"]), DataError),
    Case("data-finetune-missing", "data", R("finetune", ["data.path={tmp}/nope.jsonl"],
         ["path='{tmp}/nope.jsonl'", "Fix: pass an existing JSON/JSONL file"]), DataError),
    Case("data-finetune-empty", "data", W(_text("empty.jsonl", ""), "finetune", "data.path",
         ["{path}", "No usable records", "Fix: point `path` at a file"]), DataError),
    Case("data-finetune-malformed-json", "data", W(_text("bad.jsonl", '{"instruction": "hi", "output": "a"}\n{oops\n'),
         "finetune", "data.path", ["{path}:2", "Fix"]), DataError),
    Case("data-finetune-record-missing-field", "data", W(_text("bad.jsonl", '{"instruction": "hi", "output": "a"}\n'
         '{"instruction": "hi"}\n'), "finetune", "data.path", ["{path}:2", "missing 'output'", "skip_malformed"]),
         DataError),
    Case("data-finetune-too-short-for-one-sequence", "data", R("finetune", ["data.seq_len=8", "data.template=alpaca"],
         ["seq_len=8", "Fix: raise seq_len"]), DataError),
    Case("data-finetune-unknown-format", "data", R("finetune", ["data.format=csv"],
         ["format='csv'", "Fix: use 'auto', 'alpaca' or 'chat'"]), DataError),
    # ------------------------------------------------------------------ tokenizers
    Case("tokenizer-missing", "tokenizer", R("pretrain", ["data.tokenizer={tmp}/no_tokenizer"],
         ["{tmp}/no_tokenizer", "Pass `tokenizer=byte`"]), TokenizerError),
    Case("tokenizer-malformed", "tokenizer", _tokenizer_malformed, TokenizerError),
    Case("tokenizer-larger-than-vocab", "tokenizer", _tokenizer_too_big, TokenizerError),
    Case("tokenizer-without-eos", "tokenizer", _tokenizer_no_eos, TokenizerError),
    Case("tokenizer-from-checkpoint-without-one", "tokenizer", R("finetune", ["data.tokenizer=checkpoint"],
         ["data.tokenizer=checkpoint", "checkpoint=None", "Fix: set checkpoint=DIR"]), CheckpointError),
    # ------------------------------------------------------------------ checkpoints
    Case("ckpt-missing", "checkpoint", R("finetune", ["checkpoint={tmp}/nope"],
         ["checkpoint='{tmp}/nope'", "checkpoint=out/pretrain/last"]), CheckpointError),
    Case("ckpt-is-a-file", "checkpoint", W(_text("weights.ckpt", "x"), "finetune", "checkpoint",
         ["{path}", "is not a sharded checkpoint directory", "Use the out_dir/last"]), CheckpointError),
    Case("ckpt-incomplete", "checkpoint", _ckpt_incomplete, CheckpointError),
    Case("ckpt-truncated-shard", "checkpoint", _ckpt_truncated, CheckpointError),
    Case("ckpt-missing-shard", "checkpoint", _ckpt_shard_missing, CheckpointError),
    Case("ckpt-other-shape", "checkpoint", _ckpt_other_shape, CheckpointError),
    Case("ckpt-other-depth", "checkpoint", _ckpt_other_depth, CheckpointError),
    Case("ckpt-other-model", "checkpoint", _ckpt_other_model, CheckpointError),
    Case("ckpt-hf-other-model-type", "checkpoint", _hf_other_model, CheckpointError),
    Case("ckpt-hf-truncated", "checkpoint", _hf_truncated, CheckpointError),
    Case("ckpt-hf-other-shape", "checkpoint", _hf_other_shape, CheckpointError),
    Case("resume-missing", "checkpoint", R("pretrain", ["resume={tmp}/nope"],
         ["resume='{tmp}/nope'", "set resume=null"]), CheckpointError),
    Case("resume-truncated", "checkpoint", _resume_truncated, CheckpointError),
    Case("lora-checkpoint-adapters-only", "checkpoint", _lora_from_adapters_only, CheckpointError),
    Case("lora-resume-other-adapters", "checkpoint", _lora_resume_other_rank, CheckpointError),
    # ------------------------------------------------------------------ command-line conversions
    Case("save-onto-user-file", "checkpoint", _save_onto(user_file), CheckpointPathError),
    Case("save-onto-user-directory", "checkpoint", _save_onto(user_dir), CheckpointPathError),
    Case("consolidate-missing", "checkpoint", lambda tmp, f: (_cli("consolidate", tmp / "nope", tmp / "a.ckpt"),
         [str(tmp / "nope"), "does not exist", "Fix: pass the directory a run saved"]), SystemExit, CheckpointError),
    Case("consolidate-truncated", "checkpoint", lambda tmp, f: (lambda c: (_truncate(c / "__0_0.distcp"), (
         _cli("consolidate", c, tmp / "a.ckpt"), [str(c / "__0_0.distcp"), "Fix: copy it again"]))[1])(
         _copy(f["sharded"], tmp)), SystemExit, CheckpointError),
    Case("consolidate-out-is-dir", "checkpoint", lambda tmp, f: (_cli("consolidate", f["sharded"], tmp),
         [f"the output {str(tmp)!r} must be a file path", "Fix: pass a file name"]), SystemExit, CheckpointError),
    Case("export-other-model", "checkpoint", _export_wrong_model, SystemExit),
    Case("import-not-hf", "checkpoint", lambda tmp, f: (_cli("import", f["sharded"], tmp / "imported"),
         [str(f["sharded"] / "config.json"), "Fix: pass a Hugging Face model directory"]), SystemExit),
    Case("gguf-not-found", "checkpoint", lambda tmp, f: (_cli("from-gguf", "no_such_gguf_package", tmp / "hf"),
         ["'no_such_gguf_package'", "neither a file, a directory nor an installed package",
          "Fix: pass a .gguf file"]), SystemExit, CheckpointError),
    Case("gguf-out-dir-not-empty", "checkpoint", _gguf_onto_user_dir, SystemExit, CheckpointError),
    # ------------------------------------------------------------------ Hydra overrides
    Case("hydra-typo-trainer-key", "hydra", R("pretrain", ["trainer.max_stepz=5"],
         ["trainer.max_stepz=5", "did you mean trainer.max_steps?"]), RecipeConfigError),
    Case("hydra-typo-data-key", "hydra", R("pretrain", ["data.seq_lenn=64"],
         ["data.seq_lenn", "did you mean data.seq_len?"]), RecipeConfigError),
    Case("hydra-typo-top-level", "hydra", R("pretrain", ["bogus=1"],
         ["'bogus'", "Fix: use one of its keys", "out_dir"]), RecipeConfigError),
    Case("hydra-wrong-type-int", "hydra", R("pretrain", ["trainer.max_steps=abc"],
         ["trainer.max_steps", "'abc'", "Fix: set trainer.max_steps to a value of type int"]), RecipeConfigError),
    Case("hydra-wrong-type-bool", "hydra", R("pretrain", ["strategy.loss_parallel=maybe"],
         ["strategy.loss_parallel", "'maybe'", "type bool (e.g. strategy.loss_parallel=true)"]), RecipeConfigError),
    Case("hydra-wrong-type-float-for-int", "hydra", R("pretrain", ["data.batch_size=1.5"],
         ["data.batch_size", "1.5", "type int (e.g. data.batch_size=8)"]), RecipeConfigError),
    Case("hydra-wrong-type-devices", "hydra", R("pretrain", ["trainer.devices=abc"],
         ["trainer.devices='abc'", "Fix: set trainer.devices to 'auto', a positive int"]), EnvironmentConfigError),
    Case("hydra-wrong-type-tp-size", "hydra", R("pretrain", ["strategy.tensor_parallel_size=two"],
         ["got 'two'", "must be 'auto' or a positive int"]), MeshConfigError),
    Case("lora-unknown-method", "hydra", R("finetune", ["peft.method=qlora"],
         ["peft.method='qlora' is not one of ['none', 'lora']", "Fix: peft=lora"]), RecipeConfigError),
    Case("lora-rank-not-positive", "hydra", R("finetune", ["peft=lora", "peft.rank=0"],
         ["peft.rank=0 must be a positive int", "e.g. peft.rank=16"]), RecipeConfigError),
    Case("hydra-unknown-model-preset", "hydra", R("pretrain", ["model=llama3_9b"],
         ["model/llama3_9b", "Available options", "llama3_8b"]), ConfigCompositionException),
    # ------------------------------------------------------------------ environment
    Case("env-port-in-use-recipe", "environment", _port_in_use("recipe"), EnvironmentConfigError),
    Case("env-port-in-use-trainer", "environment", _port_in_use("trainer"), EnvironmentConfigError),
    Case("env-too-many-cpu-processes", "environment", F(_fit(lambda: TensorParallelStrategy(), devices=512),
         ["devices=512", "CPU processes", "Fix: set devices to at most"]), EnvironmentConfigError),
    Case("env-too-many-cpu-processes-recipe", "environment", R("pretrain", ["trainer.devices=512"],
         ["trainer.devices=512", "Fix: set trainer.devices to at most"]), EnvironmentConfigError),
    Case("env-more-gpus-than-exist", "environment", _more_gpus_than_exist, EnvironmentConfigError),
    Case("env-gpu-on-cpu-machine", "environment", _gpu_on_cpu_machine, EnvironmentConfigError),
    Case("env-lora-without-peft", "environment", _lora_without_peft, UnsupportedFeatureError),
]
CATEGORIES = ("mesh", "model/plan", "precision", "data", "tokenizer", "checkpoint", "hydra", "environment")


def _message(error: BaseException) -> str:
    text = str(error.code) if isinstance(error, SystemExit) else str(error)
    cause = error.__cause__
    return text + ("\n" + str(cause) if isinstance(error, ConfigCompositionException) and cause else "")


TRIED: dict[str, float] = {}  # case id -> seconds until its error, for the summary line


class _Summary:
    """Prints how many bad inputs were tried (and passed) at the end of the run, without ``-s``."""

    @staticmethod
    def pytest_terminal_summary(terminalreporter: Any) -> None:
        if TRIED:
            slowest = max(TRIED, key=TRIED.__getitem__)
            counts = {c: sum(case.category == c and case.id in TRIED for case in CASES) for c in CATEGORIES}
            terminalreporter.write_line(
                f"bad inputs tried: {len(TRIED)} of {len(CASES)}, each raised its typed error in the launching process"
                f" ({', '.join(f'{c} {n}' for c, n in counts.items())}); slowest {slowest} {TRIED[slowest]:.2f} s")


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    if not request.config.pluginmanager.has_plugin("lightning-tp-bad-inputs"):
        request.config.pluginmanager.register(_Summary(), "lightning-tp-bad-inputs")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_fast_typed_and_before_spawning(case: Case, files: dict[str, Path], tmp_path: Path) -> None:
    action, fragments = case.build(tmp_path, files)
    start = time.perf_counter()
    with pytest.raises(case.error) as info:
        action()
    elapsed = time.perf_counter() - start
    assert elapsed < LIMIT_S, f"{case.id}: took {elapsed:.1f} s"
    if case.cause is not None:
        assert isinstance(info.value.__cause__, case.cause), repr(info.value.__cause__)
    message = _message(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{case.id}: {missing} not in the message:\n{message}"
    TRIED[case.id] = elapsed


def test_the_matrix_covers_every_category() -> None:
    counts = {c: sum(case.category == c for case in CASES) for c in CATEGORIES}
    assert len(CASES) >= 30 and all(counts.values()), counts
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.category for c in CASES} == set(CATEGORIES)


def test_every_case_is_in_the_docs_table() -> None:
    table = DOCS.read_text()
    absent = [i for i in [c.id for c in CASES] + [RANK_ONLY_CASE] if f"`{i}`" not in table]
    assert not absent, f"add these cases to {DOCS}: {absent}"


@pytest.mark.parametrize("entry", ["recipe", "trainer", "lora"])
def test_a_valid_job_reaches_the_spawn_guard(entry: str, files: dict[str, Path], tmp_path: Path) -> None:
    """The guard can fail: a good input gets as far as starting the ranks, where the guard stops it (``lora``: the
    issue's LoRA command line from the sharded base, every check above passed)."""
    actions = {"recipe": lambda: _recipe("pretrain", tmp_path, files),
               "trainer": lambda: _fit(lambda: TensorParallelStrategy()),
               "lora": lambda: _recipe("finetune", tmp_path, files, "peft=lora", "peft.rank=16", "peft.alpha=32",
                                       "peft.dropout=0.05", f"checkpoint={files['sharded']}",
                                       "peft.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")}
    action = actions[entry]()
    with pytest.raises(Spawned):
        action()


def test_port_check_passes_a_free_port_and_names_a_taken_one() -> None:
    from lightning_tp.launch.preflight import check_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_port(port)  # free again once closed
    with socket.socket() as s:
        s.bind(("", port))
        s.listen()
        with pytest.raises(EnvironmentConfigError, match=f"MASTER_PORT={port} is already in use"):
            check_port(port)


# ---------------------------------------------------------------------------------------------------- inside the ranks

RANK_ONLY_CASE = "rank-sequence-length-own-dataloader"
"""Its row in docs/errors.md; the case is a real 2-rank job: tests/multiprocess/test_bad_input_in_the_ranks.py."""
