"""Model adapters, video reading and tiny models: CPU, offline, fast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkv.compat import CACHE_ARGUMENTS
from mmkv.inputs.modality import IMAGE, TEXT, VIDEO
from mmkv.inputs.video import as_video_frames, load_image, read_video
from mmkv.models import ADAPTERS, UnsupportedModelError, adapter_for, load
from mmkv.models.base import VideoFrames, common_prefix_length, render_chat
from mmkv.testing import FAMILIES, build_tiny, make_image, make_video, save_tiny

QUESTION = "what is shown in the image?"
VIDEO_QUESTION = "which object moves in the video?"
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

_BUILT: dict[str, tuple] = {}


def tiny(family: str):
    """One (model, processor) per family for the whole session (tests do not modify them)."""
    if family not in _BUILT:
        _BUILT[family] = build_tiny(family)
    return _BUILT[family]


@pytest.fixture(scope="session")
def video_path(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("media") / "square.mp4", num_frames=8, size=(64, 64), fps=4)


def two_image_chat():
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_image(1, (96, 64))},
                {"type": "image", "image": make_image(2, (64, 112))},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]


def video_chat(path: Path):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_image(3, (80, 48))},
                {"type": "video", "video": str(path)},
                {"type": "text", "text": VIDEO_QUESTION},
            ],
        }
    ]


# ----------------------------------------------------------------------------------------------
# Expected token counts, computed here from the processor's grid information
# ----------------------------------------------------------------------------------------------


def expected_counts(family: str, model, processor, inputs) -> tuple[list[int], list[int]]:
    """(tokens per image, tokens per video) the model expects, from grids/sizes in ``inputs``."""
    cfg = model.config
    if family in QWEN:
        m2 = cfg.vision_config.spatial_merge_size**2
        img = [int(g.prod()) // m2 for g in inputs.get("image_grid_thw", torch.zeros(0, 3))]
        vid = [int(g.prod()) // m2 for g in inputs.get("video_grid_thw", torch.zeros(0, 3))]
        return img, vid
    if family == "llava":
        pv = inputs["pixel_values"]
        p = cfg.vision_config.patch_size
        per = (pv.shape[-2] // p) * (pv.shape[-1] // p)
        return [per] * pv.shape[0], []
    if family == "llava_onevision":
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        n_images = len(inputs.get("image_sizes", []))
        img = []
        if n_images > 1:
            img = [side * side + 1] * n_images
        elif n_images == 1:  # anyres: count from the processor itself
            h, w = inputs["image_sizes"][0].tolist()
            img = [processor._get_number_of_features(h, w, cfg.vision_config.image_size, cfg.vision_config.image_size)]
        vid = []
        if "pixel_values_videos" in inputs:
            frames = inputs["pixel_values_videos"].shape[1]
            vid = [frames * math.ceil(side / 2) ** 2 + 1] * inputs["pixel_values_videos"].shape[0]
        return img, vid
    # idefics3 / smolvlm: every tile (split tiles + global view) is image_seq_len tokens
    return [processor.image_seq_len] * inputs["pixel_values"].shape[1], []


def token_id_counts(family: str, model, processor, ids: torch.Tensor) -> tuple[int, int]:
    ids = ids.reshape(-1)
    image_id = model.config.image_token_id
    video_id = getattr(model.config, "video_token_id", None)
    n_img = int((ids == image_id).sum())
    n_vid = int((ids == video_id).sum()) if video_id is not None else 0
    return n_img, n_vid


def check_map(family, model, processor, prepared, n_images: int, n_videos: int, question: str) -> None:
    inputs, mm = prepared.inputs, prepared.modality
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and len(mm) == ids.shape[1] == prepared.length
    counts = mm.counts()
    n_img_ids, n_vid_ids = token_id_counts(family, model, processor, ids)

    img_expect, vid_expect = expected_counts(family, model, processor, inputs)
    if family in ("llava", "idefics3", "smolvlm"):
        # frames are fed as images: image token ids cover both, the map splits them by source
        assert counts["image"] + counts["video"] == n_img_ids == sum(img_expect)
    else:
        assert counts["image"] == n_img_ids == sum(img_expect)
        assert counts["video"] == n_vid_ids == sum(vid_expect)
    assert (counts["image"] > 0) == (n_images > 0)
    assert (counts["video"] > 0) == (n_videos > 0)

    # every token of an item carries the item's modality; cells cover each item's grid exactly once
    for k, item in enumerate(mm.items):
        span = slice(item.start, item.start + item.length)
        assert (mm.item[span] == k).all() and (mm.modality[span] == item.modality).all()
        assert int((mm.item == k).sum()) == item.length
        rows, cols = mm.row[span], mm.col[span]
        cells = {(int(r), int(c)) for r, c in zip(rows, cols) if r >= 0}
        assert cells == {(r, c) for r in range(item.rows) for c in range(item.cols)}
        assert int((rows >= 0).sum()) == item.rows * item.cols
        assert ((rows < 0) == (cols < 0)).all()
    assert (mm.row[mm.modality == TEXT] == -1).all() and (mm.item[mm.modality == TEXT] == -1).all()

    # items in chat order: increasing positions; sources and frames in order per modality
    starts = [it.start for it in mm.items]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    for modality, n in ((IMAGE, n_images), (VIDEO, n_videos)):
        seq = [(it.source, it.frame) for it in mm.items if it.modality == modality]
        assert seq == sorted(seq)
        assert sorted({s for s, _ in seq}) == list(range(n))
    if n_images and n_videos:  # the chats put images before videos
        last_image = max(i for i, it in enumerate(mm.items) if it.modality == IMAGE)
        first_video = min(i for i, it in enumerate(mm.items) if it.modality == VIDEO)
        assert last_image < first_video

    # context_length points at the question; all visual tokens are context
    cl = prepared.context_length
    assert 0 < cl < prepared.length
    assert not mm.visual[cl:].any()
    tail = processor.tokenizer.decode(ids[0, cl:])
    head = processor.tokenizer.decode(ids[0, :cl])
    assert tail.lstrip().startswith(question), tail
    assert question not in head


def run_model(model, inputs) -> None:
    with torch.no_grad():
        out = model(**inputs)
        assert out.logits.shape[:2] == inputs["input_ids"].shape
        assert torch.isfinite(out.logits).all()
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3 or gen.shape[1] > inputs["input_ids"].shape[1]


# ----------------------------------------------------------------------------------------------
# Per-family: images, video, the processor's own encoding, save/load
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images(family):
    model, processor = tiny(family)
    adapter = adapter_for(model)
    assert adapter is ADAPTERS[model.config.model_type]
    prepared = adapter.prepare(model, processor, two_image_chat())
    check_map(family, model, processor, prepared, n_images=2, n_videos=0, question=QUESTION)
    assert len(prepared.images) == 2 and prepared.videos == []
    assert all(it.modality == IMAGE for it in prepared.modality.items)
    # modality_map() rebuilds the same map from the encoded inputs alone
    kwargs = {"processor": processor} if family in ("idefics3", "smolvlm") else {}
    again = adapter.modality_map(model, prepared.inputs, **kwargs)
    assert torch.equal(again.modality, prepared.modality.modality) and torch.equal(again.row, prepared.modality.row)
    run_model(model, prepared.inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_video(family, video_path):
    model, processor = tiny(family)
    prepared = adapter_for(model).prepare(model, processor, video_chat(video_path), num_frames=4)
    check_map(family, model, processor, prepared, n_images=1, n_videos=1, question=VIDEO_QUESTION)
    assert len(prepared.videos) == 1 and len(prepared.videos[0].frames) == 4
    frames = [it for it in prepared.modality.items if it.modality == VIDEO]
    if family in QWEN:  # one item per temporal group of 2 frames
        assert [it.frame for it in frames] == [0, 1]
        assert prepared.inputs["video_grid_thw"][0, 0] == 2
    else:
        assert sorted({it.frame for it in frames}) == [0, 1, 2, 3]
    if family == "qwen2_5_vl":
        assert prepared.inputs["second_per_grid_ts"].tolist() == [pytest.approx(2 / prepared.videos[0].fps)]
    if family == "qwen3_vl":  # timestamps between frame groups, each group in its own vision markers
        text = processor.tokenizer.decode(prepared.input_ids[0])
        assert "seconds><|vision_start|>" in text
    run_model(model, prepared.inputs)


def _prefill_kwargs(model, inputs) -> dict:
    """The kwargs of the first (prefill) forward call that ``generate`` makes."""
    captured: dict = {}

    def hook(module, args, kwargs):
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS})

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    return captured


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chat", ["images", "video"])
def test_map_from_generate_forward(family, chat, video_path):
    """generate() may call forward with ``mm_encoder_outputs`` instead of pixels/grids (transformers 5.23)."""
    model, processor = tiny(family)
    adapter = adapter_for(model)
    prepared = adapter.prepare(
        model, processor, two_image_chat() if chat == "images" else video_chat(video_path), num_frames=4
    )
    captured = _prefill_kwargs(model, prepared.inputs)
    mm = adapter.modality_map(model, captured)
    assert torch.equal(mm.modality, prepared.modality.modality) and torch.equal(mm.row, prepared.modality.row)
    assert [vars(a) for a in mm.items] == [vars(b) for b in prepared.modality.items]
    # a model that never saw prepare(): rebuilt from what the forward call carries
    fresh, _ = build_tiny(family)
    rebuilt = adapter.modality_map(fresh, captured)
    assert torch.equal(rebuilt.visual, prepared.modality.visual)
    exact = family in QWEN or (family == "llava_onevision" and chat == "images")
    if exact:
        assert torch.equal(rebuilt.modality, prepared.modality.modality)
        assert torch.equal(rebuilt.row, prepared.modality.row) and torch.equal(rebuilt.col, prepared.modality.col)
        assert [(i.source, i.frame, i.rows, i.cols) for i in rebuilt.items] == [
            (i.source, i.frame, i.rows, i.cols) for i in prepared.modality.items
        ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_images", [1, 2])
def test_matches_processor(family, n_images):
    """For image-only prompts the hand-built inputs equal the transformers processor's."""
    model, processor = tiny(family)
    images = [make_image(5, (96, 64)), make_image(6, (64, 112))][:n_images]
    chat = [
        {
            "role": "user",
            "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": QUESTION}],
        }
    ]
    prepared = adapter_for(model).prepare(model, processor, chat)
    text = render_chat(processor, chat)
    bos = processor.tokenizer.bos_token
    ref = processor(
        text=[text], images=[images], return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos))
    )
    assert torch.equal(ref["input_ids"], prepared.input_ids)
    for key, value in ref.items():
        if isinstance(value, torch.Tensor) and key in prepared.inputs:
            assert torch.allclose(value.to(prepared.inputs[key].dtype), prepared.inputs[key], atol=1e-5), key
    assert {"pixel_values"} <= set(prepared.inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load(family, tmp_path, video_path):
    path = save_tiny(family, tmp_path / family)
    model, processor = load(path, device="cpu")
    assert not model.training and model.dtype == torch.float32
    ref_model, ref_processor = tiny(family)
    chat = video_chat(video_path)
    a = adapter_for(ref_model).prepare(ref_model, ref_processor, chat, num_frames=4)
    b = adapter_for(model).prepare(model, processor, chat, num_frames=4)
    assert set(a.inputs) == set(b.inputs)
    for key in a.inputs:
        assert torch.equal(a.inputs[key], b.inputs[key]), key
    with torch.no_grad():
        assert torch.equal(ref_model(**a.inputs).logits, model(**b.inputs).logits)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_load_bfloat16(family, tmp_path, video_path):
    """Pixel tensors follow the model's dtype; everything else keeps its own."""
    model, processor = load(save_tiny(family, tmp_path / family), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    prepared = adapter_for(model).prepare(model, processor, video_chat(video_path), num_frames=2)
    assert prepared.inputs["pixel_values"].dtype == torch.bfloat16
    assert prepared.inputs["pixel_values_videos"].dtype == torch.bfloat16
    assert prepared.inputs["input_ids"].dtype == torch.long
    run_model(model, prepared.inputs)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_load_legacy_checkpoint_layout(family, tmp_path):
    """Checkpoints on the hub keep the image processor in preprocessor_config.json and chat_template.json."""
    path = save_tiny(family, tmp_path / family)
    config = json.loads((path / "processor_config.json").read_text())
    image_config = config.pop("image_processor")
    image_config["processor_class"] = config["processor_class"]
    (path / "preprocessor_config.json").write_text(json.dumps(image_config))
    (path / "processor_config.json").write_text(json.dumps(config))
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    model, processor = load(path, device="cpu")
    ref_model, ref_processor = tiny(family)
    assert processor.chat_template == ref_processor.chat_template
    a = adapter_for(ref_model).prepare(ref_model, ref_processor, two_image_chat())
    b = adapter_for(model).prepare(model, processor, two_image_chat())
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.inputs["pixel_values"], b.inputs["pixel_values"])


def test_onevision_single_image_anyres():
    model, processor = tiny("llava_onevision")
    chat = [
        {
            "role": "user",
            "content": [{"type": "image", "image": make_image(7, (96, 64))}, {"type": "text", "text": QUESTION}],
        }
    ]
    prepared = adapter_for(model).prepare(model, processor, chat)
    check_map("llava_onevision", model, processor, prepared, n_images=1, n_videos=0, question=QUESTION)
    tiles = [(it.tile, it.length - it.rows * it.cols) for it in prepared.modality.items]
    assert tiles[0] == ("global", 0)
    assert tiles[1][0] == "anyres" and tiles[1][1] == prepared.modality.items[1].rows  # a newline per row
    run_model(model, prepared.inputs)


def test_idefics_tiles_are_named():
    model, processor = tiny("smolvlm")
    prepared = adapter_for(model).prepare(model, processor, two_image_chat())
    names = [it.tile for it in prepared.modality.items if it.source == 0]
    assert names[-1] == "global" and names[0] == "r0c0" and all(n.startswith("r") for n in names[:-1])


def test_text_only_and_no_question():
    model, processor = tiny("qwen2_vl")
    adapter = adapter_for(model)
    prepared = adapter.prepare(model, processor, "hello there")
    assert prepared.modality.counts()["image"] == 0 and 0 < prepared.context_length < prepared.length
    chat = [{"role": "user", "content": [{"type": "image", "image": make_image(1)}]}]
    prepared = adapter.prepare(model, processor, chat)
    last_visual = int(prepared.modality.visual.nonzero().max())
    assert last_visual < prepared.context_length < prepared.length


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length(torch.tensor([[1, 2]]), [1, 2, 3]) == 2


# ----------------------------------------------------------------------------------------------
# Video reading
# ----------------------------------------------------------------------------------------------


def test_read_video_num_frames(video_path):
    v = read_video(video_path, num_frames=4)
    assert len(v.frames) == 4 == len(v.timestamps)
    assert v.frames[0].mode == "RGB" and v.frames[0].size == (64, 64)
    assert v.timestamps == sorted(v.timestamps) and v.timestamps[0] >= 0 and v.timestamps[-1] < 2.0
    assert v.duration == pytest.approx(2.0)
    assert len(read_video(video_path, num_frames=None).frames) == 8
    assert len(read_video(video_path, num_frames=50).frames) == 8  # never more than the video has
    # the moving square: the bright centre of mass moves right
    first = torch.from_numpy(np.asarray(v.frames[0].convert("L"), dtype=np.float32))
    last = torch.from_numpy(np.asarray(v.frames[-1].convert("L"), dtype=np.float32))
    cols = torch.arange(64.0)
    assert (last[32] * cols).sum() / last[32].sum() > (first[32] * cols).sum() / first[32].sum()


def test_read_video_fps(video_path):
    v = read_video(video_path, fps=2)  # 2 s of video at 2 frames per second
    assert len(v.frames) == 4 and v.fps == 2
    assert v.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert len(read_video(video_path, fps=1, num_frames=8).frames) == 2  # fps wins
    assert len(read_video(video_path, fps=4).frames) == 8


def test_as_video_frames(video_path):
    frames = [make_image(i, (32, 32)) for i in range(6)]
    v = as_video_frames(frames, num_frames=3, fps=2.0)
    assert len(v.frames) == 3 and v.timestamps == sorted(v.timestamps)
    assert len(as_video_frames(frames, num_frames=None).frames) == 6
    assert len(as_video_frames(str(video_path), num_frames=2).frames) == 2
    vf = VideoFrames(frames=frames, timestamps=[0.0] * 6, fps=1.0)
    assert as_video_frames(vf) is vf


def test_video_as_frames_in_prepare():
    model, processor = tiny("llava")
    frames = [make_image(i, (32, 32)) for i in range(3)]
    chat = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": VIDEO_QUESTION}]}]
    prepared = adapter_for(model).prepare(model, processor, chat)
    assert [(it.modality, it.source, it.frame) for it in prepared.modality.items] == [(VIDEO, 0, f) for f in range(3)]


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------


def test_error_missing_files(tmp_path):
    with pytest.raises(ValueError, match="not found.*check the path"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(ValueError, match="not found.*check the path"):
        load_image(tmp_path / "nope.png")


def test_error_unreadable_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="cannot read .* as an image"):
        load_image(bad)
    model, processor = tiny("qwen2_vl")
    chat = [{"role": "user", "content": [{"type": "image", "image": str(bad)}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="PNG/JPEG"):
        adapter_for(model).prepare(model, processor, chat)


def test_error_not_a_video(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("just some text, not a video")
    with pytest.raises(ValueError, match="video"):
        read_video(bad)
    empty = tmp_path / "empty.mp4"  # a container with zero frames
    cv2 = pytest.importorskip("cv2")
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (64, 64)).release()
    with pytest.raises(ValueError, match="video"):
        read_video(empty)
    image = tmp_path / "still.png"
    make_image(0).save(image)
    try:
        v = read_video(image)  # some OpenCV builds decode a still image as a one-frame "video"
    except ValueError as exc:
        assert "video" in str(exc)
    else:
        assert len(v.frames) == 1


def test_error_too_many_frames(video_path):
    with pytest.raises(ValueError, match="lower fps or num_frames"):
        read_video(video_path, num_frames=None, max_frames=4)
    with pytest.raises(ValueError, match="lower fps or num_frames"):
        read_video(video_path, fps=4, max_frames=6)
    with pytest.raises(ValueError, match="lower fps or num_frames"):
        as_video_frames([make_image(i) for i in range(5)], num_frames=None, max_frames=3)


def test_error_unsupported_model(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    model = T5ForConditionalGeneration(config)
    with pytest.raises(UnsupportedModelError, match="Supported families: .*Qwen2-VL"):
        adapter_for(model)
    with pytest.raises(UnsupportedModelError, match="t5"):
        adapter_for(config)
    model.save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedModelError, match="decoder-only text LM"):
        load(tmp_path / "t5")


def test_error_load_bad_path(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="check the path.*Supported families"):
        load(tmp_path / "empty")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="hub"):
        load("no-such-org/no-such-model")


def test_error_bad_chat():
    model, processor = tiny("qwen2_vl")
    adapter = adapter_for(model)
    with pytest.raises(ValueError, match="role"):
        adapter.prepare(model, processor, [[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match="image"):
        adapter.prepare(model, processor, [{"role": "user", "content": [{"type": "image", "image": 3}]}])


def test_build_tiny_shapes():
    for family in FAMILIES:
        model, processor = tiny(family)
        text = model.config.get_text_config()
        assert text.num_hidden_layers <= 3 and text.hidden_size == 64
        assert text.num_attention_heads == 4 and text.num_key_value_heads == 2
        assert model.config._attn_implementation == "sdpa" and not model.training
        assert len(processor.tokenizer) <= text.vocab_size
    a, _ = build_tiny("qwen2_vl", seed=0)
    b, _ = build_tiny("qwen2_vl", seed=0)
    c, _ = build_tiny("qwen2_vl", seed=1)
    pa, pb, pc = (next(iter(m.parameters())) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    with pytest.raises(ValueError, match="choose one of"):
        build_tiny("gpt2")
