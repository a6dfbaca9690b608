"""A word-level tokenizer built from scratch, with the Qwen special tokens and a Qwen-style chat template.

Pre-tokenization splits text into ``"\\n"``, words and digits carrying their leading space
(``" red"``, ``" 3"``), and punctuation; decoding concatenates the pieces, so
``decode(encode(text)) == text`` for any text over the vocabulary ("The red circle is in image 3.").
"""

from __future__ import annotations

from typing import Any

from .tasks import WORDS, WORDS_V2

__all__ = ["SPECIALS", "CHAT_TEMPLATE", "build_tokenizer", "vocabulary"]

SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
UNK = "<unk>"
_PATTERN = r"\n| ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]| +"
_PUNCT = ".?:,!'-()"

# Qwen2-VL's template without the default system turn: parts are written in order, images/videos as
# their vision markers around one pad token (the processor expands it).
CHAT_TEMPLATE = (
    # Each image is labelled "Image k:" (k counts the conversation's images from 1), as MileBench prompts
    # do and as Qwen's templates do with ``add_vision_id`` ("Picture k: "); ``add_vision_id=False`` drops it.
    "{% set vision = namespace(images=0) %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set vision.images = vision.images + 1 %}"
    "{% if add_vision_id is not defined or add_vision_id %}{{ 'Image ' + vision.images|string + ':' }}{% endif %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary(version: int = 1) -> list[str]:
    """Ordered vocabulary: ``<unk>``, the Qwen specials, then words (bare, capitalised, with a leading space).

    ``version=2`` appends the v2 tasks' words (``WORDS_V2``) after the whole v1 list, so v1 ids are kept.
    """
    pieces: list[str] = [UNK, *SPECIALS, "\n", " "]
    words = sorted({w for base in WORDS for w in (base, base.capitalize())})
    for w in words:
        pieces += [w, " " + w]
    for ch in "0123456789" + _PUNCT:
        pieces += [ch, " " + ch]
    if version >= 2:
        for w in sorted({w for base in WORDS_V2 for w in (base, base.capitalize())}):
            pieces += [w, " " + w]
    return list(dict.fromkeys(pieces))  # first occurrence of each piece, in order


def build_tokenizer(version: int = 1) -> Any:
    """A ``PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|endoftext|>``) with the chat template
    (``version=2``: the v2 vocabulary, a superset with the same ids for v1's pieces)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {p: i for i, p in enumerate(vocabulary(version))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (UNK, *SPECIALS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
