"""Shared fixtures. Core fixtures first; the Ray cluster fixtures follow (federation/serve tests)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402

from blocklora.base import load_base  # noqa: E402


@pytest.fixture
def tiny_base():
    """A fresh embedded tiny base (tests may mutate it: merges, tokens, injected layers)."""
    return load_base("tiny")
