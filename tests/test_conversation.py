"""Oracle tests of ``mmkv.Conversation`` (docs/methods.md, "Multi-turn: what each method does at a new turn").

- A kept cache that evicted nothing (``full``; every method at budget 1.0) must give the logits of reading
  the whole conversation from scratch with the same method (``mmkv.runtime.driver.forced_logits``, the
  path of ``mmkv.generate``), turn after turn, with new images (and a video) arriving in later turns.
- A kept cache that evicted (eviction-only plans) must give the logits of an uncompressed read of the
  whole conversation in which every token after the first prompt cannot see the evicted keys
  (``tests/oracle.py``, written from the definition of attention).
"""

from __future__ import annotations

import functools

import pytest
import torch

import mmkv
from default_methods import DEFAULT_METHODS
from mmkv.runtime.driver import forced_logits
from mmkv.testing.tiny import FAMILIES, build_tiny, make_image
from oracle import masked_continuation_logits

MEDIA_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")  # later turns may attach images / video
TOKENS = 3


@functools.cache
def tiny(family: str):
    return build_tiny(family)


def _reread_logits(model, result, method, budget) -> torch.Tensor:
    """The oracle: the same conversation tokens read from scratch, teacher-forced along the answer."""
    return forced_logits(model, result.prepared, method, budget, result.token_ids)


def _check_turn(model, result, method, budget) -> None:
    got = torch.stack(result.scores)
    want = _reread_logits(model, result, method, budget)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_kept_cache_equals_reread_three_turns(family):
    model, processor = tiny(family)
    conv = mmkv.Conversation(model, processor, "full", 1.0)
    first = conv.ask(
        "which image has the red circle ?",
        images=[make_image(0, 48), make_image(1, 48)],
        max_new_tokens=TOKENS,
        output_scores=True,
    )
    new = [make_image(2, 48)] if family in MEDIA_FAMILIES else []
    second = conv.ask("what colour is the square ?", images=new, max_new_tokens=TOKENS, output_scores=True)
    assert second.turn == 2 and not second.reread
    assert second.prefilled < second.prepared.length  # only the new turn was read
    assert second.prefilled == second.prepared.length - (first.prepared.length + len(first.token_ids) - 1)
    _check_turn(model, second, "full", 1.0)
    third = conv.ask("and the triangle ?", max_new_tokens=TOKENS, output_scores=True)
    _check_turn(model, third, "full", 1.0)
    assert third.cache_length == third.prepared.length + len(third.token_ids) - 1
    assert third.cache_bytes == conv.cache_bytes > second.cache_bytes


def test_negative_control_other_turn_two_image_changes_logits():
    """The comparison can fail: the kept cache against a re-read whose new image differs."""
    model, processor = tiny("qwen2_5_vl")
    conv = mmkv.Conversation(model, processor, "full", 1.0)
    conv.ask("which image has the red circle ?", images=[make_image(0, 48)], max_new_tokens=TOKENS)
    second = conv.ask("and this one ?", images=[make_image(2, 48)], max_new_tokens=TOKENS, output_scores=True)
    other = mmkv.Conversation(model, processor, "full", 1.0)
    other.ask("which image has the red circle ?", images=[make_image(0, 48)], max_new_tokens=TOKENS)
    changed = other.ask("and this one ?", images=[make_image(3, 48)], max_new_tokens=TOKENS, output_scores=True)
    assert not torch.allclose(second.scores[0], changed.scores[0], atol=1e-3)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_video_in_a_later_turn(family):
    model, processor = tiny(family)
    conv = mmkv.Conversation(model, processor, "full", 1.0, num_frames=4)
    conv.ask("which image has the red circle ?", images=[make_image(0, 48)], max_new_tokens=TOKENS)
    second = conv.ask(
        "which object moves ?",
        videos=[[make_image(4 + i, 48) for i in range(4)]],
        max_new_tokens=TOKENS,
        output_scores=True,
    )
    assert second.prepared.modality.counts()["video"] > 0
    _check_turn(model, second, "full", 1.0)


# HybridKV is left out: its dynamic heads' chunk store holds the first turn's context only, while a re-read
# puts the whole conversation into chunks, so even at budget 1.0 the two retrieve differently (by design).
AT_BUDGET_ONE = [c for c in DEFAULT_METHODS if c.method not in ("full", "hybridkv")]


@pytest.mark.parametrize(
    "family, case", [pytest.param(f, c, id=f"{f}-{c.id}") for f in FAMILIES for c in AT_BUDGET_ONE]
)
def test_every_method_at_budget_one_equals_reread(family, case):
    """Budget 1.0 keeps every token: continuing the kept cache is reading the conversation again (every
    family; turn 2 attaches an image where the family can take media in a later turn)."""
    model, processor = tiny(family)
    conv = mmkv.Conversation(model, processor, case.method, 1.0, **case.kwargs())
    conv.ask("which image has the red circle ?", images=[make_image(0, 48), make_image(1, 48)], max_new_tokens=TOKENS)
    new = [make_image(2, 48)] if family in MEDIA_FAMILIES else []
    second = conv.ask("and the square ?", images=new, max_new_tokens=TOKENS, output_scores=True)
    _check_turn(model, second, case.method, 1.0)


EVICTING = [c for c in DEFAULT_METHODS if c.replayable and c.method != "full" and not c.decode_policy]


@pytest.mark.parametrize(
    "family, case",
    [pytest.param("qwen2_5_vl", c, id=f"qwen2_5_vl-{c.id}") for c in EVICTING]
    + [pytest.param("llava", c, id=f"llava-{c.id}") for c in EVICTING if c.method == "snapkv"],
)
def test_evicting_kept_cache_equals_masked_reread(family, case):
    """Turn 2 after a compressing turn 1 = the whole conversation read with the evicted keys masked out."""
    model, processor = tiny(family)
    conv = mmkv.Conversation(model, processor, case.method, 0.3, **case.kwargs())
    first = conv.ask(
        "which image has the red circle ?", images=[make_image(0, 48), make_image(1, 48)], max_new_tokens=TOKENS
    )
    kept = {layer.layer: [torch.as_tensor(k) for k in layer.kept] for layer in first.trace.layers}
    span = first.prepared.length
    assert any(len(k) < span for heads in kept.values() for k in heads)  # turn 1 evicted something
    new = [make_image(2, 48)]
    second = conv.ask("and the square ?", images=new, max_new_tokens=1, output_scores=True)
    want = masked_continuation_logits(model, second.prepared.inputs, kept, span)
    torch.testing.assert_close(second.scores[0], want, atol=2e-4, rtol=1e-4)
    # negative control: without the masks (a full read) the logits differ
    full = forced_logits(model, second.prepared, "full", 1.0, second.token_ids)[0]
    assert not torch.allclose(full, want, atol=1e-3)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MEDIA_FAMILIES])
def test_later_media_refused_where_the_family_cannot(family):
    model, processor = tiny(family)
    conv = mmkv.Conversation(model, processor, "snapkv", 0.5)
    conv.ask("which image has the red circle ?", images=[make_image(0, 48)], max_new_tokens=TOKENS)
    before = (conv.cache_bytes, list(conv._ids))
    with pytest.raises(ValueError, match=rf"{family}.*reread=True"):
        conv.ask("and this one ?", images=[make_image(1, 48)], max_new_tokens=TOKENS)
    assert (conv.cache_bytes, conv._ids) == before  # unchanged: the conversation goes on
    again = conv.reread("and this one ?", images=[make_image(1, 48)], max_new_tokens=TOKENS)
    assert again.reread and again.prefilled == again.prepared.length


def test_reset_frees_the_cache_and_a_too_long_turn_is_refused(monkeypatch):
    model, processor = tiny("qwen2_vl")
    conv = mmkv.Conversation(model, processor, "snapkv", 0.5)
    result = conv.ask("which image has the red circle ?", images=[make_image(0, 48)], max_new_tokens=TOKENS)
    assert result.cache_bytes == conv.cache_bytes > 0 and result.held_tokens > 0
    text_config = model.config.get_text_config(decoder=True)
    monkeypatch.setattr(text_config, "max_position_embeddings", result.cache_length + 8)
    with pytest.raises(ValueError, match="conv.reset"):
        conv.ask("and the square ? " * 4, max_new_tokens=TOKENS)
    conv.reset()
    assert conv.cache is None and conv.cache_bytes == 0 and conv.history == [] and conv.turns == 0


def test_turn_policies():
    model, processor = tiny("qwen2_vl")
    assert mmkv.Conversation(model, processor, "snapkv", 0.5).turn_policy is mmkv.TurnPolicy.APPEND
    for policy in ("compress_new", "rescore"):
        with pytest.raises(ValueError, match="not implemented"):
            mmkv.Conversation(model, processor, "snapkv", 0.5, turn_policy=policy)
    with pytest.raises(ValueError, match="unknown turn_policy"):
        mmkv.Conversation(model, processor, "snapkv", 0.5, turn_policy="forget")
