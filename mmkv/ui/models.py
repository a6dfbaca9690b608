"""Loaded models shared by all app sessions (a small LRU), with load errors turned into short UserErrors.

Safe to serve the public (see ``docs/hosting.md``):

- only allowed names load (:class:`~mmkv.ui.config.HostingSettings`: ``MMKV_ALLOWED_MODELS``, on by
  default when hosted), and checkpoints over ``MMKV_MAX_MODEL_GB`` are refused before any download;
- messages are one or two lines, never show a server path and never tell a missing folder from one that
  exists but does not load (the full error goes to the server log);
- a hub id fails in about ``MMKV_HUB_TIMEOUT`` seconds when the hub is unreachable (a model already in the
  local cache then loads from it, without the network);
- loading one model never blocks requests on models already loaded: :meth:`ModelStore.get` returns a
  loaded model at once; loads of one name wait for each other, and one load runs at a time (memory);
- each model's processor is bounded to ``MMKV_MAX_IMAGE_TOKENS`` / ``MMKV_MAX_VIDEO_TOKENS`` at load.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..bundled import BUNDLED_ALIASES, BUNDLED_MODEL, resolve_model_name
from .config import HostingSettings
from .errors import UserError

__all__ = ["LoadedModel", "ModelStore", "SUGGESTED_MODELS", "hub_reachable", "is_path_like"]

log = logging.getLogger("mmkv.models")

#: Shown in the model dropdown where allowed (:meth:`ModelStore.choices`).
SUGGESTED_MODELS = (
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2-VL-2B-Instruct",
    "HuggingFaceTB/SmolVLM-256M-Instruct",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
)

#: Weight files counted by the size limit (safetensors preferred when a checkpoint has both kinds).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
MAX_SHOWN_NAME = 40


@dataclass
class LoadedModel:
    name: str  # the store's key: a hub id or a local path (never shown; see ``label``)
    model: Any
    processor: Any
    load_s: float
    label: str = ""  # what the page shows: the typed hub id, "bundled", or a folder's base name
    bounds: str = ""  # what the visual token bounds do for this model (one line)

    def __post_init__(self) -> None:
        self.label = self.label or public_label(self.name)

    @property
    def family(self) -> str:
        return str(getattr(self.model.config, "model_type", "?"))

    @property
    def context(self) -> int | None:
        cfg = self.model.config.get_text_config(decoder=True)
        return getattr(cfg, "max_position_embeddings", None)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> str:
        params = self.parameters
        device = next(self.model.parameters()).device
        return f"`{self.label}` · {self.family} · {params / 1e6:.1f} M parameters · {device} · loaded in {self.load_s:.1f} s"


#: Below this many parameters a model runs on one CPU thread: tiny matmuls gain nothing from more
#: threads and lose a lot when the cores are shared (measured: 30x slower Compare with 2 busy threads).
SMALL_MODEL_PARAMETERS = 50_000_000


def cpu_threads(loaded: LoadedModel, default: int) -> int:
    """torch CPU threads for running ``loaded``: ``MMKV_THREADS`` if set, 1 for small models, else ``default``."""
    env = os.environ.get("MMKV_THREADS", "").strip()
    if env:
        return max(1, int(env))
    return 1 if loaded.parameters < SMALL_MODEL_PARAMETERS else default


# ---- names -------------------------------------------------------------------------------------
def is_path_like(text: str) -> bool:
    """Whether a typed name reads as a filesystem path (judged from the text alone, never the disk)."""
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
        or ":" in text
    )


def public_label(name: str) -> str:
    """A name safe to show: hub ids as they are, the bundled model as ``bundled``, other paths by base name."""
    if name == str(BUNDLED_MODEL):
        return "bundled"
    if is_path_like(name) or os.path.isdir(name):
        return Path(name.rstrip("/\\")).name or "local model"
    return name


def _shown(typed: str) -> str:
    """The typed name for a message: itself when it is not a path (shortened), else ``that path``."""
    if is_path_like(typed):
        return "that path"
    text = "".join(ch for ch in typed if ch.isprintable()).replace("`", "'")
    return f"`{text[:MAX_SHOWN_NAME]}{'…' if len(text) > MAX_SHOWN_NAME else ''}`"


# ---- the hub -------------------------------------------------------------------------------------
_PROBE: dict[str, tuple[float, bool]] = {}  # endpoint -> (time, reachable)
_PROBE_LOCK = threading.Lock()


def hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # noqa: BLE001
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def hub_reachable(timeout: float = 1.5, endpoint: str | None = None) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` s (DNS included: the probe runs in a
    daemon thread, so a hanging lookup cannot hold the caller). ``HF_HUB_OFFLINE`` answers False at once.
    Answers are remembered 30 s (unreachable) / 5 min (reachable)."""
    if hub_offline():
        return False
    endpoint = endpoint or hub_endpoint()
    now = time.monotonic()
    with _PROBE_LOCK:
        known = _PROBE.get(endpoint)
    if known is not None and now - known[0] < (300.0 if known[1] else 30.0):
        return known[1]
    url = urlparse(endpoint)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") if url.scheme == "https" else None
    proxy = proxy or os.environ.get("ALL_PROXY") or os.environ.get("all_proxy")  # noqa: SIM112 -- curl's lowercase spelling
    if proxy and "://" in proxy:  # behind a proxy, the proxy is what must answer
        url = urlparse(proxy)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except Exception:  # noqa: BLE001 - any failure means unreachable
            result.append(False)

    thread = threading.Thread(target=probe, name="mmkv-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    ok = bool(result and result[0])
    with _PROBE_LOCK:
        _PROBE[endpoint] = (time.monotonic(), ok)
    return ok


def _weight_bytes(files: list[tuple[str, int]]) -> int:
    """Bytes of the weights transformers would read: the safetensors files if any, else the others."""
    weights = [(n, s) for n, s in files if n.lower().endswith(WEIGHT_SUFFIXES)]
    safe = [s for n, s in weights if n.lower().endswith(".safetensors")]
    return sum(safe) if safe else sum(s for _, s in weights)


def local_weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a checkpoint folder's weight files (top level and one level down; links followed)."""
    files: list[tuple[str, int]] = []
    root = Path(folder)
    for path in [*root.glob("*"), *root.glob("*/*")]:
        try:
            if path.is_file():
                files.append((path.name, path.stat().st_size))
        except OSError:
            continue
    return _weight_bytes(files)


def cached_snapshot(repo_id: str) -> str | None:
    """The local hub-cache folder of ``repo_id`` when its ``config.json`` is cached (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id, an unreadable cache
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def hub_weight_bytes(repo_id: str, timeout: float) -> int | None:
    """Weight bytes of a hub repo from its metadata (no download); raises the hub's errors."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, files_metadata=True, timeout=timeout)
    files = [(s.rfilename, int(s.size or 0)) for s in (info.siblings or [])]
    return _weight_bytes(files) if files else None


# ---- the store -----------------------------------------------------------------------------------
@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelStore:
    """Load on first use, keep the ``capacity`` (``MMKV_MAX_MODELS``) most recently used models, the
    default one always among them, and only load allowed names (``settings``: from the environment)."""

    def __init__(self, default: str, capacity: int | None = None, settings: HostingSettings | None = None) -> None:
        self.default = resolve_model_name(str(default).strip())  # "bundled" -> its folder
        self.settings = settings or HostingSettings.from_env()
        self.capacity = capacity or int(os.environ.get("MMKV_MAX_MODELS", "2"))
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards the dicts only; never held while loading
        self._slots: dict[str, _Slot] = {}
        self._loading = threading.Lock()  # one checkpoint read at a time (peak memory), held by loads only
        self._default_threads = torch.get_num_threads()

    # ---- names
    def canonical(self, name: str | None) -> str:
        """The store key of a typed name: blank / ``default`` / the default's label -> the default model,
        the bundled model's aliases -> its folder, anything else stripped."""
        text = (name or "").strip()
        if not text or text == "default" or text == self.label(self.default):
            return self.default
        if text in BUNDLED_ALIASES:
            return str(BUNDLED_MODEL)
        return resolve_model_name(text.rstrip("/\\") if is_path_like(text) else text)

    def label(self, name: str) -> str:
        """What the page shows for a store key (never an absolute path)."""
        return public_label(name)

    def _allowed_keys(self) -> set[str] | None:
        names = self.settings.allowed_models
        if names is None:
            return None
        keys = {self.default, str(BUNDLED_MODEL)}
        for n in names:
            keys.add(resolve_model_name(n.rstrip("/\\") if is_path_like(n) else n))
        return keys

    def allowed(self, name: str | None) -> bool:
        keys = self._allowed_keys()
        return keys is None or self.canonical(name) in keys

    def allowed_labels(self) -> list[str]:
        """The allowed names as the page shows them (default first), or ``[]`` when anything is allowed."""
        keys = self._allowed_keys()
        if keys is None:
            return []
        ordered = [self.default, str(BUNDLED_MODEL), *sorted(keys - {self.default, str(BUNDLED_MODEL)})]
        return list(dict.fromkeys(self.label(k) for k in ordered))

    def choices(self) -> list[str]:
        """Names for the model dropdown: the default, then the allowed (or, if anything goes, suggested) ones."""
        labels = self.allowed_labels()
        if not labels:
            labels = [self.label(self.default), *SUGGESTED_MODELS]
        return list(dict.fromkeys([self.label(self.default), *labels]))

    def _pick_hint(self) -> str:
        if self.settings.allowed_models is None:
            return f"Type a hub id or a checkpoint folder, or pick `{self.label(self.default)}`."
        labels = self.allowed_labels()
        shown = ", ".join(f"`{x}`" for x in labels[:3]) + (", …" if len(labels) > 3 else "")
        return f"Pick {'one of ' if len(labels) > 1 else ''}{shown}."

    # ---- loading
    def is_loaded(self, name: str | None = None) -> bool:
        return self.canonical(name) in self._models

    def loaded(self) -> list[str]:
        return list(self._models)

    def get(self, name: str | None = None) -> LoadedModel:
        """The loaded model (loading it if needed), with torch's CPU threads set for it.

        A model already loaded comes back at once, even while another model loads; a name not allowed,
        too big, or unreachable fails fast with a short :class:`UserError`."""
        key = self.canonical(name)
        with self._lock:
            found = self._models.get(key)
            if found is not None:
                self._models.move_to_end(key)
            else:
                slot = self._slots.setdefault(key, _Slot())
        if found is None:
            typed = (name or "").strip() or key
            with slot.lock:  # a second request for the same name waits for the first load
                with self._lock:
                    found = self._models.get(key)
                if found is None:
                    found = self._load(key, typed)
                    with self._lock:
                        self._models[key] = found
                        self._evict()
        threads = cpu_threads(found, self._default_threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return found

    def _evict(self) -> None:
        """Drop least recently used models beyond ``capacity`` (the default model and the newest one stay)."""
        newest = next(reversed(self._models), None)
        while len(self._models) > self.capacity:
            victim = next((k for k in self._models if k not in (self.default, newest)), None)
            if victim is None:
                break
            self._models.pop(victim)
            self._slots.pop(victim, None)

    def _load(self, key: str, typed: str) -> LoadedModel:
        shown = _shown(typed)
        if not self.allowed(key):
            raise UserError(f"{shown} is not available on this server. {self._pick_hint()}")
        source = self._source(key, typed)
        t0 = time.perf_counter()
        try:
            with self._loading:
                model, processor = self._loader(source)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure becomes one short message; details to the log
            log.warning("loading model %r failed: %s: %s", key, type(exc).__name__, exc)
            raise UserError(self._failure(typed, exc)) from exc
        bounds = self._bound(model, processor)
        return LoadedModel(key, model, processor, time.perf_counter() - t0, label=self.label(key), bounds=bounds)

    @staticmethod
    def _loader(source: str) -> tuple[Any, Any]:
        from ..models import load

        return load(source)

    def _bound(self, model: Any, processor: Any) -> str:
        from ..models import bound_visual_tokens

        s = self.settings
        try:
            return bound_visual_tokens(model, processor, s.max_image_tokens, s.max_video_tokens)
        except Exception as exc:  # noqa: BLE001 - an odd processor: serve it unbounded, say so in the log
            log.warning("could not bound the visual tokens of this model: %s", exc)
            return "unbounded (the processor did not take the bounds)"

    def _failure(self, typed: str, exc: BaseException) -> str:
        from ..models import UnsupportedModelError

        if is_path_like(typed):
            return (
                f"Cannot load that path: it is not a readable checkpoint folder (config.json + weights) of a "
                f"supported family. {self._pick_hint()}"
            )
        if isinstance(exc, UnsupportedModelError):
            return (
                f"{_shown(typed)} is not a model mmkv can run (Qwen-VL, LLaVA, LLaVA-OneVision, Idefics3, "
                f"SmolVLM or a text LM). {self._pick_hint()}"
            )
        return f"Cannot load {_shown(typed)}: not a complete checkpoint of a supported family. {self._pick_hint()}"

    def _too_big(self, typed: str, size: int) -> UserError:
        limit = self.settings.max_model_gb
        return UserError(
            f"{_shown(typed)} is too big for this server ({size / 1e9:.1f} GB of weights, limit "
            f"{limit:g} GB). {self._pick_hint()}"
        )

    def _check_size(self, typed: str, size: int | None) -> None:
        limit = self.settings.max_model_gb
        if limit is not None and size is not None and size > limit * 1e9:
            raise self._too_big(typed, size)

    def _source(self, key: str, typed: str) -> str:
        """What to pass to ``load``: a local folder or a hub id, after the size and reachability checks."""
        if os.path.isdir(key):
            self._check_size(typed, local_weight_bytes(key))
            return key
        if is_path_like(key) or is_path_like(typed):
            raise UserError(self._failure(typed, FileNotFoundError()))  # same words as a folder that fails
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(key)
        except HFValidationError:
            raise UserError(f"Cannot load {_shown(typed)}: not a hub id (org/name). {self._pick_hint()}") from None
        timeout = self.settings.hub_timeout_s
        snapshot = cached_snapshot(key)
        if hub_reachable(timeout):
            try:
                size = hub_weight_bytes(key, timeout=max(timeout, 5.0))
            except Exception as exc:  # noqa: BLE001
                name = type(exc).__name__
                if (
                    "NotFound" in name
                    or "Gated" in name
                    or getattr(getattr(exc, "response", None), "status_code", 0) in (401, 403, 404)
                ):
                    what = "gated (needs a token)" if "Gated" in name else "not found"
                    raise UserError(
                        f"{_shown(typed)} is {what} on the Hugging Face hub: check the name. {self._pick_hint()}"
                    ) from None
                log.warning("hub metadata of %r unavailable: %s: %s", key, name, exc)
                size = None
                if snapshot is None:
                    return key  # metadata failed but the hub answered: let the loader try
            self._check_size(typed, size)
            return key
        if snapshot is not None:  # offline, but cached: load from the cache folder, no network calls
            self._check_size(typed, local_weight_bytes(snapshot))
            return snapshot
        raise UserError(
            f"{_shown(typed)} is not on this server and the Hugging Face hub is unreachable. {self._pick_hint()}"
        )
