"""Shared fixtures and markers of the test suite.

Fixtures (several test files used to build these themselves):

- ``tiny_prepared``: a builder, ``tiny_prepared(family="qwen2_5_vl", n_images=2, size=64)``, that
  returns a *fresh* tiny random-weight model of that family, its processor, and a prepared prompt of
  ``n_images`` test images and the question "which image has the red circle ?". Fresh on every call,
  because tests patch, scale or compress the model they get.
- ``bundled``: the bundled teaching model and processor (``mmkv.load("bundled", device="cpu")``),
  loaded once per session. Tests only generate with it; one that changes it must build its own.

Markers (registered in pyproject.toml; for choosing tests locally, ``pytest -m "not slow"`` — CI and
``bash scripts/test.sh`` run everything):

- ``browser``: drives the real app in Chromium (tests/test_browser.py);
- ``slow``: builds wheels or virtual environments, runs the README's commands, starts a server or
  a Ray instance (test_readme.py, test_ray_sweep.py, test_browser.py);
- ``gpu``: needs CUDA (skipped without it).

Markers are given here by file (``MARKED_FILES``) and by the CUDA skip a test carries, so a test file
does not repeat them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

QUESTION = "which image has the red circle ?"

MARKED_FILES = {
    "test_browser.py": ("browser", "slow"),
    "test_readme.py": ("slow",),
    "test_ray_sweep.py": ("slow",),
}


def prepare_tiny(family: str = "qwen2_5_vl", n_images: int = 2, size: int = 64, question: str = QUESTION):
    """A fresh tiny model of ``family``, its processor, and the prepared ``n_images``-image prompt."""
    import mmkv
    from mmkv.testing.tiny import build_tiny, make_image

    model, processor = build_tiny(family)
    content = [{"type": "image", "image": make_image(i, size)} for i in range(n_images)]
    content.append({"type": "text", "text": question})
    prepared = mmkv.adapter_for(model).prepare(model, processor, [{"role": "user", "content": content}])
    return model, processor, prepared


@pytest.fixture
def tiny_prepared():
    """``tiny_prepared(family, n_images=2, size=64)`` -> (model, processor, prepared), built fresh."""
    return prepare_tiny


@pytest.fixture(scope="session")
def bundled():
    """The bundled teaching model and its processor, on CPU, loaded once for the whole session."""
    import mmkv

    return mmkv.load("bundled", device="cpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in MARKED_FILES.get(Path(str(item.fspath)).name, ()):
            item.add_marker(getattr(pytest.mark, name))
        for mark in item.iter_markers("skipif"):
            if "CUDA" in str(mark.kwargs.get("reason", "")):
                item.add_marker(pytest.mark.gpu)
