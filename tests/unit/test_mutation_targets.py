"""Every mutation of ``tests/mutations.py`` still names code that exists: its file, and the text it replaces exactly
once. A refactor that moves the code fails here, in the fast tier, instead of at the next (40-minute) mutation run."""

from __future__ import annotations

import mutations
import pytest
from paths import ROOT


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_mutation_target_occurs_once(mutation: mutations.Mutation) -> None:
    source = (ROOT / mutation.file).read_text()
    assert source.count(mutation.old) == 1, f"{mutation.file}: update the mutation {mutation.name}"
    for token in mutation.tests:
        if token.endswith(".py"):
            assert (ROOT / token).is_file(), f"{mutation.name} selects a missing test file {token}"
