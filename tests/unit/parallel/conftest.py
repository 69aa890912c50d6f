"""Fixtures of the plan tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def mesh() -> Iterator[Any]:
    """A 1-rank gloo process group (an in-memory store, no port) and its 1-D CPU mesh: the plans' styles applied for
    real in one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
