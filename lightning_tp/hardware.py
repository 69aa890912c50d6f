"""Hardware figures: peak FLOP/s by device name, and the accelerators and links the planner uses.

A leaf module: it imports nothing of the package but :mod:`lightning_tp.errors`. It owns

* :data:`PEAK_FLOPS` and :func:`peak_flops_for`: dense peak FLOP/s by device name, which the
  throughput monitor (:mod:`lightning_tp.training.callbacks`) divides by for MFU;
* :data:`ACCELERATORS` and :data:`LINKS`: the named entries the dry-run planner
  (:mod:`lightning_tp.planner`) estimates with, extended with :func:`register_accelerator` /
  :func:`register_link` or with a JSON/YAML file (:func:`load_hardware`, or ``hardware_file=PATH``
  on the ``lightning-tp plan`` command line)::

    accelerators:
      - {name: mi300x, peak_flops: {bf16: 1307e12}, memory_gib: 192, hbm_bandwidth: 5.3e12,
         devices_per_node: 8, intra_node_link: xgmi, inter_node_link: ib_ndr}
    links:
      - {name: xgmi, bandwidth: 448e9, efficiency: 0.7, latency: 10e-6}

The accelerators' bf16, tf32 and fp32 peaks are read from :data:`PEAK_FLOPS`, so the planner and the
throughput monitor never disagree. Sources for the other figures: NVIDIA's H100/H200/A100 datasheets
(memory, HBM bandwidth, NVLink: 900 GB/s H100/H200 and 600 GB/s A100 *bidirectional* per GPU, i.e.
450 and 300 GB/s per direction) and ConnectX-7 / ConnectX-6 NICs (400 / 200 Gb/s per GPU, i.e. 50 /
25 GB/s per direction, one NIC per GPU as in DGX/HGX nodes). The fp8 peak (dense, 1,979 TFLOP/s on
H100/H200 SXM) is the datasheet's, which ``PEAK_FLOPS`` does not list.

A link's ``efficiency`` is the fraction of the nominal per-direction bandwidth NCCL reaches on large
messages (bus bandwidth in nccl-tests terms); the defaults are round figures in the range public
nccl-tests runs report, not measurements of ours. An accelerator's ``efficiency`` (H100/H200 0.4,
A100 0.65) is the fraction of peak FLOP/s training kernels sustain, communication excluded; the
defaults are round figures from torchtitan's published dense Llama runs on those parts (H100 MFU
33-39 %; A100 51-58 % MFU, about 69 % of peak in hardware FLOPs under full checkpointing).
docs/planner.md compares the planner with those runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_tp.errors import LightningTPError

__all__ = [
    "ACCELERATORS",
    "LINKS",
    "PEAK_FLOPS",
    "Accelerator",
    "HardwareError",
    "Link",
    "get_accelerator",
    "get_link",
    "load_hardware",
    "peak_flops_for",
    "register_accelerator",
    "register_link",
]

GiB = 2**30

# Dense (no sparsity) peak FLOP/s per GPU, by `torch.cuda.get_device_name()` substring. Order
# matters: the first match wins, so specific names come before their prefixes ("H100 PCIe" before
# "H100", "L40S" before "L4"). Keys of the inner dicts: "bf16" (also used for fp16/mixed precision),
# "tf32" (fp32 matmuls on tensor cores), "fp32" (plain fp32). A plain "NVIDIA H100 80GB HBM3" is the
# SXM part.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 59.8e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
)


def _precision_kind(precision: str) -> str | None:
    """Which peak applies to a Lightning precision string: ``"bf16"``, ``"tf32"``, ``"fp32"`` or
    ``None`` (64-bit: no tensor-core peak)."""
    precision = str(precision)
    if "64" in precision:
        return None
    if "16" in precision or "transformer-engine" in precision:
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops_for(device_name: str, precision: str = "bf16-mixed") -> float | None:
    """Dense peak FLOP/s of one device from :data:`PEAK_FLOPS`, or ``None`` when unknown."""
    kind = _precision_kind(precision)
    if kind is None:
        return None
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(kind)
    return None


class HardwareError(LightningTPError):
    """An accelerator or link is unknown or described with invalid figures."""


@dataclass(frozen=True)
class Link:
    """A point-to-point fabric as one GPU sees it."""

    name: str
    bandwidth: float
    """Nominal bytes/s per GPU per direction."""
    efficiency: float = 0.8
    """Fraction of ``bandwidth`` a ring collective reaches on large messages."""
    latency: float = 10e-6
    """Seconds added per collective call (launch + synchronisation)."""
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not self.bandwidth > 0:
            problems.append(f"bandwidth={self.bandwidth!r} must be > 0 bytes/s")
        if not 0 < self.efficiency <= 1:
            problems.append(f"efficiency={self.efficiency!r} must be in (0, 1]")
        if self.latency < 0:
            problems.append(f"latency={self.latency!r} must be >= 0 seconds")
        if problems:
            raise HardwareError(f"Link {self.name!r}: " + "; ".join(problems) + ".")

    @property
    def effective_bandwidth(self) -> float:
        return self.bandwidth * self.efficiency


@dataclass(frozen=True)
class Accelerator:
    """One device model and the node it usually sits in."""

    name: str
    peak_flops: dict[str, float]
    """Dense peak FLOP/s by kind: ``bf16`` (also fp16), ``tf32``, ``fp32``, and ``fp8`` where the
    part has it."""
    memory_gib: float
    """Device memory in GiB as ``torch.cuda.get_device_properties().total_memory`` reports it
    (H100 80GB: ~79)."""
    hbm_bandwidth: float
    """Device memory bandwidth, bytes/s (used for the optimizer step, which is memory-bound)."""
    devices_per_node: int = 8
    intra_node_link: str = "nvlink4"
    inter_node_link: str = "ib_ndr"
    description: str = ""
    efficiency: float = 0.4
    """Default fraction of peak FLOP/s training kernels sustain on this part (the planner's
    ``efficiency``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not self.peak_flops or any(not v > 0 for v in self.peak_flops.values()):
            problems.append(f"peak_flops={self.peak_flops!r} must map 'bf16'/'tf32'/'fp32' to"
                            " positive FLOP/s")
        if not self.memory_gib > 0:
            problems.append(f"memory_gib={self.memory_gib!r} must be > 0")
        if not self.hbm_bandwidth > 0:
            problems.append(f"hbm_bandwidth={self.hbm_bandwidth!r} must be > 0 bytes/s")
        if not 0 < self.efficiency <= 1:
            problems.append(f"efficiency={self.efficiency!r} must be in (0, 1]")
        if not isinstance(self.devices_per_node, int) or self.devices_per_node <= 0:
            problems.append(f"devices_per_node={self.devices_per_node!r} must be a positive int")
        if problems:
            raise HardwareError(f"Accelerator {self.name!r}: " + "; ".join(problems) + ".")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    def peak(self, precision: str) -> float:
        """Peak FLOP/s for a Lightning precision string (16-bit → ``bf16``, else ``tf32`` then
        ``fp32``)."""
        kinds = ("bf16",) if "16" in str(precision) else ("tf32", "fp32")
        for kind in kinds:
            if kind in self.peak_flops:
                return self.peak_flops[kind]
        raise HardwareError(f"Accelerator {self.name!r} has no peak for precision {precision!r}"
                            f" (kinds {kinds}); add it to `peak_flops`.")


def _peaks(device_substring: str) -> dict[str, float]:
    for key, peaks in PEAK_FLOPS:
        if key == device_substring:
            return dict(peaks)
    raise KeyError(device_substring)  # pragma: no cover - PEAK_FLOPS lost an entry used below


LINKS: dict[str, Link] = {}
ACCELERATORS: dict[str, Accelerator] = {}


def register_link(link: Link, *, overwrite: bool = False) -> Link:
    """Add ``link`` to :data:`LINKS` under ``link.name`` (``overwrite=True`` replaces an entry)."""
    if link.name in LINKS and not overwrite:
        raise HardwareError(f"A link named {link.name!r} exists; pass overwrite=True to replace"
                            " it.")
    LINKS[link.name] = link
    return link


def register_accelerator(accelerator: Accelerator, *, overwrite: bool = False) -> Accelerator:
    """Add ``accelerator`` to :data:`ACCELERATORS` (its links must be registered first)."""
    if accelerator.name in ACCELERATORS and not overwrite:
        raise HardwareError(f"An accelerator named {accelerator.name!r} exists; pass"
                            " overwrite=True to replace it.")
    for attr in ("intra_node_link", "inter_node_link"):
        get_link(getattr(accelerator, attr), what=f"{accelerator.name}.{attr}")
    ACCELERATORS[accelerator.name] = accelerator
    return accelerator


def _lookup(table: dict[str, Any], name: str, what: str, fix: str) -> Any:
    if name in table:
        return table[name]
    near = difflib.get_close_matches(str(name), table, n=2)
    hint = f" Did you mean {' or '.join(map(repr, near))}?" if near else ""
    raise HardwareError(f"Unknown {what} {name!r}. Known: {', '.join(table)}.{hint} {fix}")


def get_link(name: str, what: str = "link") -> Link:
    return _lookup(LINKS, name, what,
                   "Add one with lightning_tp.hardware.register_link or hardware_file=PATH.")


def get_accelerator(name: str) -> Accelerator:
    return _lookup(ACCELERATORS, name, "accelerator",
                   "Add one with lightning_tp.hardware.register_accelerator or hardware_file=PATH.")


_NUMERIC = {"bandwidth", "efficiency", "latency", "memory_gib", "hbm_bandwidth"}


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_hardware(path: str | Path) -> tuple[list[Link], list[Accelerator]]:
    """Register the ``links`` and ``accelerators`` listed in a JSON or YAML file (entries replace
    entries of the same name)."""
    path = Path(path)
    if not path.is_file():
        raise HardwareError(f"hardware_file={str(path)!r} does not exist; give a JSON or YAML file"
                            " with `accelerators:` and/or `links:` lists.")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict) or not set(data) <= {"accelerators", "links"}:
        keys = sorted(data) if isinstance(data, dict) else []
        raise HardwareError(f"hardware_file={str(path)!r} must hold a mapping with keys"
                            f" 'accelerators' and/or 'links', got {type(data).__name__} with keys"
                            f" {keys}.")
    links, accelerators = [], []
    for cls, key, out, register in ((Link, "links", links, register_link),
                                    (Accelerator, "accelerators", accelerators,
                                     register_accelerator)):
        names = {f.name for f in dataclasses.fields(cls)}
        for entry in data.get(key) or []:
            unknown = set(entry) - names
            if unknown:
                raise HardwareError(f"hardware_file={str(path)!r}: {key} entry"
                                    f" {entry.get('name')!r} has unknown fields {sorted(unknown)};"
                                    f" valid fields: {sorted(names)}.")
            # PyYAML reads `100e9` (no dot, no sign in the exponent) as a string: accept numbers
            # written that way.
            entry = {k: _number(v) if k in _NUMERIC else v for k, v in entry.items()}
            if isinstance(entry.get("peak_flops"), dict):
                entry["peak_flops"] = {k: _number(v) for k, v in entry["peak_flops"].items()}
            try:
                out.append(register(cls(**entry), overwrite=True))
            except (TypeError, ValueError) as e:
                raise HardwareError(f"hardware_file={str(path)!r}: {key} entry {entry!r}:"
                                    f" {e}") from None
    return links, accelerators


for _link in (
    Link("nvlink4", 450e9, 0.8, 10e-6,
         "NVLink 4 (H100/H200 SXM): 18 links x 25 GB/s per direction"),
    Link("nvlink3", 300e9, 0.8, 10e-6, "NVLink 3 (A100 SXM): 12 links x 25 GB/s per direction"),
    Link("ib_ndr", 50e9, 0.9, 20e-6, "InfiniBand NDR, 400 Gb/s per GPU (one ConnectX-7 per GPU)"),
    Link("ib_hdr", 25e9, 0.9, 20e-6, "InfiniBand HDR, 200 Gb/s per GPU (one ConnectX-6 per GPU)"),
    Link("eth_100g", 12.5e9, 0.7, 50e-6, "100 Gb/s Ethernet (RoCE) per GPU"),
    Link("pcie4", 32e9, 0.6, 15e-6, "PCIe 4.0 x16 between GPUs, no NVLink"),
):
    register_link(_link)

for _accelerator in (
    Accelerator("h100", {**_peaks("H100"), "fp8": 1979e12}, 79, 3.35e12, 8, "nvlink4", "ib_ndr",
                "NVIDIA H100 SXM5 80GB HBM3"),
    Accelerator("h200", {**_peaks("H200"), "fp8": 1979e12}, 139, 4.8e12, 8, "nvlink4", "ib_ndr",
                "NVIDIA H200 SXM 141GB HBM3e"),
    # A100 sustains a larger fraction of its (3x lower) peak: the memory-bound share of a step
    # weighs less.
    Accelerator("a100", _peaks("A100"), 79, 2.039e12, 8, "nvlink3", "ib_hdr",
                "NVIDIA A100 SXM4 80GB", 0.65),
):
    register_accelerator(_accelerator)
