"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Tests build their models locally; nothing may be downloaded from the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from pipeline.models import CACHE_ENV_VAR


@pytest.fixture(scope="session")
def knowsep_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Cache of converted embedded models: ``$KNOWSEP_CACHE`` when set, else a session temp dir.

    The variable is set for the session, so that code which reads the default cache (the
    core eval loads the store's model by name) uses the same converted copy. CI sets it
    so that an embedded model is converted once across runs.
    """
    existing = os.environ.get(CACHE_ENV_VAR)
    if existing:
        yield Path(existing)
        return
    cache = tmp_path_factory.mktemp("knowsep-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV_VAR, str(cache))
        yield cache
