"""Serving the public (issue 12): the model allow-list and size limit, short messages without server
paths, failing fast without the hub, loads that do not block loaded models, visual token bounds per
family, and the prompt-size check. CPU, offline, tiny models only."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkv.bundled import BUNDLED_MODEL, EXAMPLES_DIR
from mmkv.models import adapter_for, bound_visual_tokens, bounds_of, load
from mmkv.testing.tiny import build_tiny, make_video, save_tiny
from mmkv.ui import capacity
from mmkv.ui import models as store_module
from mmkv.ui.capacity import check_capacity, kv_bytes_per_token, prompt_preview
from mmkv.ui.config import HOSTING_DEFAULTS, HostingSettings, is_hosted
from mmkv.ui.errors import UserError
from mmkv.ui.models import ModelStore

ROOT = Path(__file__).resolve().parent.parent
UNKNOWN = "mmkv-tests/no-such-model-b7c1"

ENV = (
    "SPACE_ID",
    "MMKV_HOSTED",
    "MMKV_ALLOWED_MODELS",
    "MMKV_MAX_MODEL_GB",
    "MMKV_MAX_IMAGE_TOKENS",
    "MMKV_MAX_VIDEO_TOKENS",
    "MMKV_MAX_PROMPT_TOKENS",
    "MMKV_HUB_TIMEOUT",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    store_module._PROBE.clear()
    yield
    store_module._PROBE.clear()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("qwen2_5_vl", tmp_path_factory.mktemp("models") / "tiny-a")


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return save_tiny("qwen2_vl", tmp_path_factory.mktemp("models") / "tiny-b")


def hosted_settings(monkeypatch, **env) -> HostingSettings:
    monkeypatch.setenv("SPACE_ID", "someone/mmkv")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return HostingSettings.from_env()


def refused(store: ModelStore, name: str) -> str:
    with pytest.raises(UserError) as info:
        store.get(name)
    return str(info.value)


FORBIDDEN = [str(ROOT), "/tmp", str(Path.home()), str(BUNDLED_MODEL), "/work", "/root", "/home"]


def assert_short_and_pathless(message: str, *extra_paths: str) -> None:
    assert message.count("\n") <= 1, message
    assert len(message) <= 200, (len(message), message)
    for path in [*FORBIDDEN, *map(str, extra_paths)]:
        assert path not in message, (path, message)
    assert not re.search(r"(^|[\s`'\"(])/[\w.]", message), message  # no absolute path of any kind


# ---- settings ------------------------------------------------------------------------------------
def test_settings_hosted_defaults_and_overrides(monkeypatch):
    local = HostingSettings.from_env()
    assert not local.hosted and local.allowed_models is None and local.max_model_gb is None
    assert local.max_image_tokens == HOSTING_DEFAULTS["max_image_tokens"][1] and local.max_prompt_tokens is None
    s = hosted_settings(monkeypatch)
    assert s.hosted and s.allowed_models == () and s.max_model_gb == 20.0
    assert (s.max_image_tokens, s.max_video_tokens, s.max_prompt_tokens) == (1024, 4096, 16384)
    monkeypatch.setenv("MMKV_HOSTED", "0")
    assert not is_hosted()
    monkeypatch.setenv("MMKV_HOSTED", "1")
    monkeypatch.setenv("MMKV_ALLOWED_MODELS", " Qwen/Qwen2.5-VL-3B-Instruct , org/b ")
    monkeypatch.setenv("MMKV_MAX_MODEL_GB", "0")
    monkeypatch.setenv("MMKV_MAX_IMAGE_TOKENS", "256")
    monkeypatch.setenv("MMKV_MAX_PROMPT_TOKENS", "none")
    s = HostingSettings.from_env()
    assert s.allowed_models == ("Qwen/Qwen2.5-VL-3B-Instruct", "org/b") and s.max_model_gb is None
    assert s.max_image_tokens == 256 and s.max_prompt_tokens is None
    monkeypatch.setenv("MMKV_ALLOWED_MODELS", "*")
    assert HostingSettings.from_env().allowed_models is None


# ---- allow-list ----------------------------------------------------------------------------------
def test_hosted_store_loads_only_allowed_names(monkeypatch, tiny_dir, other_dir):
    store = ModelStore(str(tiny_dir), settings=hosted_settings(monkeypatch))
    store._loader = lambda source: pytest.fail(f"a refused name reached the loader: {source}")
    for name in (UNKNOWN, "Qwen/Qwen2.5-VL-7B-Instruct", str(other_dir), "../../etc", "/etc/passwd"):
        t0 = time.perf_counter()
        message = refused(store, name)
        assert time.perf_counter() - t0 < 1.0  # decided from the name alone: no disk, no network
        assert "not available" in message and "`tiny-a`" in message and "`bundled`" in message
        assert_short_and_pathless(message, tiny_dir, other_dir)
    assert store.choices() == ["tiny-a", "bundled"]  # the dropdown offers only what loads


def test_allowed_names_load_and_show_no_paths(monkeypatch, tiny_dir, other_dir):
    store = ModelStore(str(tiny_dir), settings=hosted_settings(monkeypatch, MMKV_ALLOWED_MODELS=str(other_dir)))
    default = store.get()
    assert default.name == str(tiny_dir) and default.label == "tiny-a"
    assert str(tmp := tiny_dir.parent) not in default.describe() and "`tiny-a`" in default.describe()
    assert store.get("bundled").label == "bundled" and store.get("mmkv-tiny-qwen2vl") is store.get("bundled")
    assert store.get(str(other_dir)).family == "qwen2_vl"
    assert store.get("tiny-a") is default and store.get("default") is default and store.get("") is default
    assert str(tmp) not in store.get(str(other_dir)).describe()


def test_same_message_whether_or_not_a_folder_exists(tmp_path, tiny_dir):
    store = ModelStore(str(tiny_dir), settings=HostingSettings())  # local: anything may be tried
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    wrong = tmp_path / "bert"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    messages = {refused(store, str(p)) for p in (tmp_path / "missing", empty, broken, wrong, a_file, "./nope/", "~/x")}
    assert len(messages) == 1, messages  # nothing tells which of these exist
    (message,) = messages
    assert "that path" in message and "config.json" in message
    assert_short_and_pathless(message, tmp_path)


def test_every_load_message_is_short_and_pathless(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stores = [
        ModelStore(str(tiny_dir), settings=HostingSettings()),
        ModelStore(str(tiny_dir), settings=hosted_settings(monkeypatch, MMKV_ALLOWED_MODELS=f"{UNKNOWN},x y")),
        ModelStore(str(tiny_dir), settings=HostingSettings(max_model_gb=1e-9)),
    ]
    names = [
        UNKNOWN,
        "not a valid id !!",
        "x y",
        "a" * 300,
        "gpt2",
        str(tmp_path),
        str(tiny_dir),
        "/",
        "C:\\models\\x",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "bad`name\nwith newline",
    ]
    seen = 0
    for store in stores:
        for name in names:
            try:
                store.get(name)
            except UserError as exc:
                assert_short_and_pathless(str(exc), tmp_path, tiny_dir)
                seen += 1
    assert seen >= 25


def test_size_limit_checked_before_loading(monkeypatch, tiny_dir):
    store = ModelStore("bundled", settings=HostingSettings(allowed_models=None, max_model_gb=1e-6))
    store._loader = lambda source: pytest.fail("the loader ran for a model over the size limit")
    message = refused(store, str(tiny_dir))
    assert "too big" in message and "GB" in message
    assert_short_and_pathless(message, tiny_dir)
    # hub ids: sized from the hub's metadata, before any download
    monkeypatch.setattr(store_module, "hub_reachable", lambda timeout=1.5, endpoint=None: True)
    monkeypatch.setattr(store_module, "hub_weight_bytes", lambda repo, timeout: 30_000_000_000)
    store.settings = HostingSettings(max_model_gb=20.0)
    message = refused(store, "Qwen/Qwen2.5-VL-32B-Instruct")
    assert "too big" in message and "30.0 GB" in message and "20 GB" in message


def test_weight_bytes_prefer_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 5000)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 9000)
    assert store_module.local_weight_bytes(tmp_path) == 1000


# ---- failing fast without the hub ------------------------------------------------------------------
def test_unknown_hub_id_fails_fast(tiny_dir):
    """Before: 23-25 s of retries and an 839-character message (measured offline)."""
    store = ModelStore(str(tiny_dir), settings=HostingSettings())
    t0 = time.perf_counter()
    message = refused(store, UNKNOWN)
    assert time.perf_counter() - t0 < 5.0
    assert UNKNOWN in message
    assert_short_and_pathless(message)


def test_unreachable_hub_times_out(monkeypatch, tiny_dir):
    monkeypatch.setattr(store_module, "hub_endpoint", lambda: "https://192.0.2.1")  # TEST-NET-1: never answers
    store = ModelStore(str(tiny_dir), settings=HostingSettings(hub_timeout_s=0.5))
    store._loader = lambda source: pytest.fail("tried to load while the hub is unreachable")
    t0 = time.perf_counter()
    message = refused(store, UNKNOWN)
    assert time.perf_counter() - t0 < 5.0
    assert "unreachable" in message
    t0 = time.perf_counter()
    refused(store, UNKNOWN + "-2")  # the probe's answer is remembered
    assert time.perf_counter() - t0 < 0.5


def test_a_hanging_hub_lookup_is_cut_short(monkeypatch, tiny_dir):
    """A DNS lookup or connect that hangs (no answer at all) is abandoned after MMKV_HUB_TIMEOUT."""
    hang = threading.Event()

    def connect(*args, **kwargs):
        hang.wait(60)
        raise OSError("answered too late")

    monkeypatch.setattr(store_module.socket, "create_connection", connect)
    monkeypatch.setenv("MMKV_HUB_TIMEOUT", "0.5")
    store = ModelStore(str(tiny_dir), settings=HostingSettings.from_env())
    assert store.settings.hub_timeout_s == 0.5
    t0 = time.perf_counter()
    message = refused(store, UNKNOWN)
    elapsed = time.perf_counter() - t0
    hang.set()
    assert elapsed < 5.0 and "unreachable" in message


def test_offline_loads_a_cached_model_from_the_cache(monkeypatch, tmp_path, tiny_dir):
    import huggingface_hub

    repo = "mmkv-tests/cached-tiny"
    cache = tmp_path / "hub"
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = ModelStore("bundled", settings=HostingSettings())
    loaded = store.get(repo)
    assert loaded.name == repo and loaded.label == repo and loaded.family == "qwen2_5_vl"
    assert str(tmp_path) not in loaded.describe()


# ---- loads do not block loaded models ------------------------------------------------------------
def test_a_slow_load_does_not_block_loaded_models(tiny_dir, other_dir):
    store = ModelStore(str(tiny_dir), settings=HostingSettings())
    default = store.get()
    release, started = threading.Event(), threading.Event()
    calls = []
    real = ModelStore._loader

    def slow(source):
        calls.append(source)
        started.set()
        release.wait(30)
        return real(source)

    store._loader = slow
    results: list = []
    loaders = [threading.Thread(target=lambda: results.append(store.get(str(other_dir)))) for _ in range(2)]
    for t in loaders:
        t.start()
    assert started.wait(10)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(store.get()))
    reader.start()
    reader.join(5)  # would hang until `release` if the load held a store-wide lock
    assert got == [default] and not release.is_set()
    assert store.is_loaded() and not store.is_loaded(str(other_dir))
    release.set()
    for t in loaders:
        t.join(30)
    assert len(results) == 2 and results[0] is results[1] and calls == [str(other_dir)]  # loaded once


def test_default_model_is_never_evicted(tiny_dir, other_dir):
    store = ModelStore(str(tiny_dir), capacity=1, settings=HostingSettings())
    store.get()
    store.get(str(other_dir))
    store.get("bundled")
    assert str(tiny_dir) in store.loaded() and str(BUNDLED_MODEL) in store.loaded() and len(store.loaded()) == 2


# ---- visual token bounds -------------------------------------------------------------------------
def _image_chat(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}]


def _video_chat(video):
    return [{"role": "user", "content": [{"type": "video", "video": str(video)}, {"type": "text", "text": "what?"}]}]


def test_qwen25_photo_tokens_before_and_after_the_bound():
    """A 1920x1080 photo with Qwen2.5-VL's released processor range (3136..12845056 pixels)."""
    from mmkv.models.qwen_vl import _set_size

    model, processor = build_tiny("qwen2_5_vl")
    _set_size(processor.image_processor, 3136, 12845056)
    adapter = adapter_for(model)
    photo = Image.new("RGB", (1920, 1080), (90, 120, 200))
    before = adapter.prepare(model, processor, _image_chat(photo)).modality.counts()["image"]
    big = adapter.prepare(model, processor, _image_chat(Image.new("RGB", (4032, 3024)))).modality.counts()["image"]
    assert (before, big) == (2691, 15552)
    bound_visual_tokens(model, processor, 1024, 4096)
    prepared = adapter.prepare(model, processor, _image_chat(photo))
    after = prepared.modality.counts()["image"]
    assert after == 1008
    assert (
        adapter.prepare(model, processor, _image_chat(Image.new("RGB", (4032, 3024)))).modality.counts()["image"]
        <= 1024
    )
    with torch.no_grad():
        model(**prepared.inputs)  # the model agrees with the bounded inputs


@pytest.mark.parametrize(
    "family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision", "idefics3", "smolvlm"]
)
def test_bounds_shrink_images_and_videos_of_every_family(family, tmp_path):
    model, processor = build_tiny(family)
    adapter = adapter_for(model)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8))
    video = make_video(tmp_path / "v.mp4", num_frames=40, fps=4)

    def counts():
        img = adapter.prepare(model, processor, _image_chat(photo))
        vid = adapter.prepare(model, processor, _video_chat(video), num_frames=16)
        return img, vid

    img0, vid0 = counts()
    description = bound_visual_tokens(model, processor, 8, 12)
    assert bounds_of(processor).image_tokens == 8 and description
    img, vid = counts()
    n_img, n_vid = img.modality.counts()["image"], vid.modality.counts()["video"]
    assert n_vid < vid0.modality.counts()["video"]
    if family == "llava":  # fixed 16 tokens per picture: images cannot shrink; a video keeps 1 frame
        assert n_img == img0.modality.counts()["image"] and n_vid == 16
    elif family == "llava_onevision":  # a lone image's floor is one tile; video: frames x 4 + a newline
        assert n_img < img0.modality.counts()["image"] and n_vid <= 12 + 1
    else:
        assert n_img <= 8 < img0.modality.counts()["image"] and n_vid <= 12
    with torch.no_grad():  # the model accepts the bounded inputs
        model(**img.inputs)
        model(**vid.inputs)


def test_bundled_examples_unchanged_by_the_hosted_bounds(monkeypatch):
    settings = hosted_settings(monkeypatch)
    model, plain = load(BUNDLED_MODEL)
    _, bounded = load(BUNDLED_MODEL)
    bound_visual_tokens(model, bounded, settings.max_image_tokens, settings.max_video_tokens)
    adapter = adapter_for(model)
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text(encoding="utf-8"))
    assert examples
    for ex in examples:
        parts = [
            {
                "type": "video" if f.endswith((".webm", ".mp4")) else "image",
                ("video" if f.endswith((".webm", ".mp4")) else "image"): str(EXAMPLES_DIR / f),
            }
            for f in ex["files"]
        ]
        chat = [{"role": "user", "content": [*parts, {"type": "text", "text": ex["text"]}]}]
        for frames in (4, 8, 32):
            a = adapter.prepare(model, plain, chat, num_frames=frames)
            b = adapter.prepare(model, bounded, chat, num_frames=frames)
            assert torch.equal(a.input_ids, b.input_ids), (ex["text"], frames)


def test_store_bounds_each_loaded_model(monkeypatch, tiny_dir):
    store = ModelStore(str(tiny_dir), settings=hosted_settings(monkeypatch, MMKV_MAX_IMAGE_TOKENS="16"))
    loaded = store.get()
    assert (bounds_of(loaded.processor).image_tokens, bounds_of(loaded.processor).video_tokens) == (16, 4096)
    assert "images up to 16 tokens" in loaded.bounds  # the tiny processor alone allows 36


# ---- prompt size and capacity ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """A tiny Qwen2.5-VL whose context is shrunk to 64 positions."""
    model, processor = build_tiny("qwen2_5_vl")
    model.config.get_text_config(decoder=True).max_position_embeddings = 64

    class Loaded:
        pass

    loaded = Loaded()
    loaded.model, loaded.processor = model, processor
    return loaded


def _prepare(loaded, n_images=1, text="what is here?"):
    pics = [Image.new("RGB", (112, 112), (i * 30, 0, 0)) for i in range(n_images)]
    chat = [
        {"role": "user", "content": [*({"type": "image", "image": p} for p in pics), {"type": "text", "text": text}]}
    ]
    return adapter_for(loaded.model).prepare(loaded.model, loaded.processor, chat)


def test_prompt_preview_counts_tokens_and_kv_bytes(small):
    prepared = _prepare(small, n_images=1)
    size = prompt_preview(small, prepared, 4, max_prompt_tokens=None, free_bytes=None)
    tc = small.model.config.get_text_config(decoder=True)
    per_token = tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 2 * 4
    assert kv_bytes_per_token(small.model) == per_token
    assert size.tokens == prepared.length == size.text + size.image + size.video
    assert size.images == 1 and size.image == 16 and size.kv_bytes == size.tokens * per_token
    assert size.fits and size.limit == 64 - 4 and "1 image 16" in size.summary() and "fits" in size.summary()
    over = prompt_preview(small, _prepare(small, n_images=2), 4, max_prompt_tokens=None, free_bytes=None)
    assert not over.fits and "too big" in over.summary() and over.tokens > 60


def test_prompt_over_the_context_is_refused_with_how_to_shrink(small):
    prepared = _prepare(small, n_images=4)
    assert prepared.length > 64
    with pytest.raises(UserError) as info:
        check_capacity(small, prepared, 8, max_prompt_tokens=None, free_bytes=None)
    message = str(info.value)
    assert "at most 64" in message and "fewer images" in message
    assert_short_and_pathless(message)
    check_capacity(small, _prepare(small, n_images=1), 8, max_prompt_tokens=None, free_bytes=None)  # fits


def test_prompt_over_the_server_limit_is_refused(monkeypatch, small):
    prepared = _prepare(small, n_images=1)
    monkeypatch.setenv("MMKV_MAX_PROMPT_TOKENS", str(prepared.length - 1))
    with pytest.raises(UserError, match="MMKV_MAX_PROMPT_TOKENS"):
        check_capacity(small, prepared, 1, free_bytes=None)
    monkeypatch.setenv("MMKV_MAX_PROMPT_TOKENS", str(prepared.length))
    assert check_capacity(small, prepared, 1, free_bytes=None).fits


def test_prompt_over_the_device_memory_is_refused(monkeypatch, small):
    prepared = _prepare(small, n_images=1)
    monkeypatch.setattr(capacity, "device_free_bytes", lambda device: 256 * 1024**2 + 200_000)  # a nearly full device
    with pytest.raises(UserError) as info:
        check_capacity(small, prepared, 1, max_prompt_tokens=None)
    message = str(info.value)
    assert "to spare" in message and "Shrink it to at most" in message
    assert_short_and_pathless(message)
    monkeypatch.setattr(capacity, "device_free_bytes", lambda device: 8 * 1024**3)
    assert check_capacity(small, prepared, 1, max_prompt_tokens=None).fits


def test_device_free_bytes_reads_this_machine():
    free = capacity.device_free_bytes("cpu")
    assert free is None or free > 0
