"""Plain causal text LMs (no vision tower) through the same API, with no hand-made ModalityMap."""

from __future__ import annotations

import pytest
import torch

import mmkv
from default_methods import DEFAULT_METHODS, MethodConfig, params
from mmkv.methods import make_method
from mmkv.models import TEXT_ADAPTER, adapter_for
from oracle import compressed_logits, masked_reference_logits

PROMPT = "Image 1: a red circle. " * 6 + "The password is blue. " + "A green square. " * 6 + "What is the password?"


@pytest.fixture(scope="module")
def text_lm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmkv.tiny.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return mmkv.load(folder, device="cpu")  # the real loading path: AutoModelForCausalLM + AutoTokenizer


def test_a_text_lm_gets_the_text_adapter_and_an_all_text_map(text_lm):
    model, tokenizer = text_lm
    assert type(model).__name__ == "LlamaForCausalLM" and adapter_for(model) is TEXT_ADAPTER
    prepared = TEXT_ADAPTER.prepare(model, tokenizer, mmkv.chat(PROMPT))
    assert prepared.modality.counts() == {"text": prepared.length, "image": 0, "video": 0}
    # the question starts where the context ends: re-encoding the context alone gives the same prefix
    assert 0 < prepared.context_length < prepared.length


def test_images_on_a_text_lm_are_refused_with_a_clear_message(text_lm):
    model, tokenizer = text_lm
    with pytest.raises(ValueError, match="text-only model"):
        mmkv.generate(model, tokenizer, mmkv.chat("What is this?", images=["a.png"]), method="full")


def test_full_is_token_identical_to_plain_generate(text_lm):
    model, tokenizer = text_lm
    result = mmkv.generate(model, tokenizer, mmkv.chat(PROMPT), method="full", budget=1.0, max_new_tokens=8)
    ids = result.prepared.input_ids
    plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert result.token_ids == plain[0, ids.shape[1] :].tolist()[: len(result.token_ids)]


# every method whose plan is kept positions only (tests/default_methods.py), Full aside
EVICTING = [case for case in DEFAULT_METHODS if case.replayable and case.budget != "full"]


@pytest.mark.parametrize("case", params(EVICTING))
def test_eviction_equals_masked_attention_without_a_map(text_lm, case: MethodConfig):
    """``mmkv.compress`` builds the all-text map itself; logits equal a full run with the evicted keys masked."""
    model, tokenizer = text_lm
    prepared = TEXT_ADAPTER.prepare(model, tokenizer, mmkv.chat(PROMPT))
    tokens = [5, 9, 13]
    method = make_method(case.method, **case.kwargs())
    got, session, _ = compressed_logits(model, prepared, method, tokens, budget=0.3)
    kept = {t.layer: [torch.tensor(k) for k in t.kept] for t in session.trace.layers}
    assert 0.25 < session.trace.summary()["kept_ratio"] < 0.35
    want = masked_reference_logits(model, prepared.inputs, kept, tokens)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
