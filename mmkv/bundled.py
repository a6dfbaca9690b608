"""The files the package ships: the bundled teaching model and the app's examples.

They live inside the package (``mmkv/assets/``), so ``pip install mmkv`` carries them and every entry
point finds them from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: The bundled teaching model (a real ``Qwen2VLForConditionalGeneration``; see its model card).
BUNDLED_MODEL = ASSETS_DIR / "mmkv-tiny-qwen2vl"
#: The app's examples (``examples.json`` + the images and video it names).
EXAMPLES_DIR = ASSETS_DIR / "examples"

#: Names that mean the bundled model wherever the command runs (the last one is the repo path of
#: earlier releases, kept so older commands keep working).
BUNDLED_ALIASES = ("bundled", "mmkv-tiny-qwen2vl", "assets/mmkv-tiny-qwen2vl")


def resolve_model_name(name_or_path: str | os.PathLike) -> str:
    """A local path or hub id as given, except the bundled model's aliases, which become its directory."""
    text = str(name_or_path)
    if text in BUNDLED_ALIASES and not os.path.isdir(text):
        return str(BUNDLED_MODEL)
    return text
