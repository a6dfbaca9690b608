"""Plain causal language models (Llama, Qwen2, Mistral, SmolLM, ...): every prompt token is text.

Any decoder-only model ``AutoModelForCausalLM`` loads gets this adapter when no vision-language family
claims its ``model_type``, so ``mmkv.generate`` and ``mmkv.compress`` work on text LMs with no
hand-made map: the :class:`~mmkv.inputs.modality.ModalityMap` is all text and the text baselines (and the
multimodal methods, which then see text only) run unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from ..inputs.modality import ModalityMap
from .base import Chat, ModelAdapter, PreparedInputs, as_chat, context_length_of, encode_text, to_model


class _TokenizerAsProcessor:
    """What :func:`encode_text` needs from a processor, for a bare tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer


class TextLMAdapter(ModelAdapter):
    """Decoder-only text models: chat template of the tokenizer (or plain text), an all-text map."""

    family = "text"
    model_types = ()

    def load_processor(self, name_or_path: str, **kwargs: Any) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)

    @staticmethod
    def _tokenizer(processor: Any) -> Any:
        return getattr(processor, "tokenizer", processor)

    def render(self, processor: Any, chat: Chat) -> str:
        """The chat through the tokenizer's template, or as plain text when it has none."""
        tokenizer = self._tokenizer(processor)
        for message in chat:
            for part in message["content"]:
                if part["type"] != "text":
                    raise ValueError(
                        f"{type(tokenizer).__name__} belongs to a text-only model: it cannot read a {part['type']}. "
                        "Remove the images/videos or load a vision-language model"
                    )
        texts = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"])} for m in chat]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(texts, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in texts)

    def prepare(
        self,
        model: torch.nn.Module,
        processor: Any,
        chat: Chat | str,
        *,
        num_frames: int | None = None,
        video_fps: float | None = None,
    ) -> PreparedInputs:
        chat = as_chat(chat)
        wrapped = _TokenizerAsProcessor(self._tokenizer(processor))

        def encode(c: Chat) -> list[int]:
            return encode_text(wrapped, self.render(processor, c))

        ids = encode(chat)
        input_ids = torch.tensor([ids], dtype=torch.long)
        inputs = to_model({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, model)
        return PreparedInputs(
            inputs=inputs,
            modality=ModalityMap.text_only(len(ids)),
            context_length=context_length_of(encode, chat, ids),
        )

    def modality_map(self, model: torch.nn.Module, inputs: dict[str, Any], **kwargs: Any) -> ModalityMap:
        ids = inputs.get("input_ids")
        if ids is None:
            embeds = inputs.get("inputs_embeds")
            if embeds is None:
                raise ValueError("the forward call has neither input_ids nor inputs_embeds")
            return ModalityMap.text_only(int(embeds.shape[1]))
        return ModalityMap.text_only(int(ids.shape[-1]))


def is_text_lm(config: Any) -> bool:
    """A decoder-only language model: a ``model_type`` ``AutoModelForCausalLM`` knows, no vision tower."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) or hasattr(config, "vision_config"):
        return False
    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
