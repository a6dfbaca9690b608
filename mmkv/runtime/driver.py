"""``mmkv.generate``: prefill -> compress -> (streaming) decode, returning the answer and a Trace.

Query-aware (default, as in LOOK-M / MEDA / MadaKV / HybridKV): the whole prompt, question included,
is prefilled with the full cache and compressed afterwards, so the *first* answer token is computed
before any eviction. Query-agnostic (``query_aware=False``, kvpress-style): only the context (images,
video and text before the final question) is prefilled and compressed; the question is then
processed against the compressed cache, so compression can change every answer token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from transformers import DynamicCache

from ..compat import cache_kwargs, model_config
from ..methods import Method
from ..models import PreparedInputs, adapter_for
from ..models.base import Chat
from ..trace.core import Trace
from .session import Session

# Prompt-side inputs that are per token and must be split with the query-agnostic context.
_PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    trace: Trace
    prepared: PreparedInputs


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def check_prompt_length(model: torch.nn.Module, prompt_length: int, max_new_tokens: int) -> None:
    """Raise a fixable error when prompt + answer exceed the model's context window."""
    cfg = model_config(model).get_text_config(decoder=True)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and prompt_length + max_new_tokens > limit:
        raise ValueError(
            f"the prompt has {prompt_length} tokens and {max_new_tokens} new tokens were asked for, but the model's "
            f"context is {limit} tokens: shorten the text, attach fewer images or video frames, or lower max_new_tokens"
        )


class Generation:
    """An in-progress generation: iterate for text deltas; ``result`` is set when it ends."""

    def __init__(self, steps: Iterator[str]) -> None:
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._steps

    def run(self) -> GenerationResult:
        for _ in self._steps:
            pass
        assert self.result is not None
        return self.result


def _select(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    if not do_sample:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _token_string(tokenizer: Any, token: int) -> str:
    """A special token (EOS, ...) by its token string, for the decode replay."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    out = convert(int(token)) if convert is not None else None
    return out if isinstance(out, str) else ""


def _reset_rope_state(model: torch.nn.Module) -> None:
    """Qwen-VL models keep ``rope_deltas`` between calls; clear it so a new prompt recomputes it."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


def _ensure_rope_state(model: torch.nn.Module, device: torch.device) -> None:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas") and inner.rope_deltas is None:
        inner.rope_deltas = torch.zeros(1, 1, dtype=torch.long, device=device)


def _session_for(
    model: torch.nn.Module,
    prepared: PreparedInputs,
    method: str | Method,
    budget: float | int,
    query_aware: bool,
    **session_kwargs: Any,
) -> tuple[Session, int]:
    """The session for one prepared prompt and the length of the span it compresses."""
    context = prepared.length if query_aware else prepared.context_length
    if not 0 < context <= prepared.length:
        raise ValueError("query-agnostic mode needs a context before the question: put images/text before it")
    modality = prepared.modality if query_aware else prepared.modality.prefix(context)
    return Session(model, method, budget, modality=modality, query_aware=query_aware, **session_kwargs), context


@overload
def generate(
    model: torch.nn.Module,
    processor: Any,
    chat: Chat | str | None,
    method: str | Method = ...,
    budget: float | int = ...,
    *,
    stream: Literal[False] = ...,
    **kwargs: Any,
) -> GenerationResult: ...
@overload
def generate(
    model: torch.nn.Module,
    processor: Any,
    chat: Chat | str | None,
    method: str | Method = ...,
    budget: float | int = ...,
    *,
    stream: Literal[True],
    **kwargs: Any,
) -> Generation: ...
@overload
def generate(
    model: torch.nn.Module,
    processor: Any,
    chat: Chat | str | None,
    method: str | Method = ...,
    budget: float | int = ...,
    *,
    stream: bool,
    **kwargs: Any,
) -> GenerationResult | Generation: ...
def generate(
    model: torch.nn.Module,
    processor: Any,
    chat: Chat | str | None,
    method: str | Method = "snapkv",
    budget: float | int = 0.2,
    *,
    max_new_tokens: int = 64,
    query_aware: bool = True,
    stream: bool = False,
    num_frames: int | None = 8,
    video_fps: float | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    record_attention: bool = True,
    record_scores: bool = False,
    prepared: PreparedInputs | None = None,
    preallocate: bool = False,
    **method_params: Any,
) -> GenerationResult | Generation:
    """Answer ``chat`` with a compressed KV cache.

    ``method`` is a name (``"snapkv"``, ``"adakv"``, ...) or a :class:`~mmkv.methods.Method`;
    ``budget`` a ratio in (0, 1] of the compressed span or an absolute token count (int) per layer
    and KV head. Returns a :class:`GenerationResult` (text, token ids, Trace), or with
    ``stream=True`` a :class:`Generation` to iterate for text deltas. ``chat`` may be None when
    ``prepared`` (inputs from the adapter's ``prepare``) is given. ``preallocate=True`` reserves
    room for ``max_new_tokens`` in every cache layer after compression, so decoding writes in place
    instead of copying the cache at every step (the reserved room counts in the trace's bytes).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if prepared is None:
        if chat is None:
            raise ValueError("generate needs a chat, or prepared inputs (prepared=...)")
        prepared = adapter_for(model).prepare(model, processor, chat, num_frames=num_frames, video_fps=video_fps)
    generation, _ = start_generation(
        model,
        processor,
        prepared,
        method,
        budget,
        max_new_tokens=max_new_tokens,
        query_aware=query_aware,
        sampling=Sampling(do_sample, temperature, top_p, seed),
        record_attention=record_attention,
        record_scores=record_scores,
        preallocate=preallocate,
        method_params=method_params,
    )
    return generation if stream else generation.run()


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``do_sample=False``) or sampled with temperature / top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


def start_generation(
    model: torch.nn.Module,
    processor: Any,
    prepared: PreparedInputs,
    method: str | Method,
    budget: float | int,
    *,
    max_new_tokens: int,
    query_aware: bool = True,
    sampling: Sampling = Sampling(),
    record_attention: bool = True,
    record_scores: bool = False,
    preallocate: bool = False,
    method_params: dict[str, Any] | None = None,
    scores: list[torch.Tensor] | None = None,
) -> tuple[Generation, Session]:
    """The lazy :class:`Generation` :func:`generate` runs, and its session (which holds the compressed cache
    after the run: ``session.cache``). ``scores``, when given, receives every step's next-token logits."""
    check_prompt_length(model, prepared.length, max_new_tokens)
    session, context = _session_for(
        model,
        prepared,
        method,
        budget,
        query_aware,
        record_attention=record_attention,
        record_scores=record_scores,
        method_params=method_params or {},
        reserve=max_new_tokens if preallocate else 0,
    )
    generation = Generation(iter(()))
    run = compressed_run(model, prepared, session, context)
    generation._steps = _run(model, processor, prepared, session, run, max_new_tokens, sampling, generation, scores)
    return generation, session


def _cached_forward(model: torch.nn.Module, session: Session, cache: Any) -> Any:
    """``forward(**inputs)``: one forward on ``cache`` under ``session``, returning the last position's logits."""

    def forward(**kwargs: Any) -> torch.Tensor:
        with session.bound(), torch.inference_mode():
            return model(**kwargs, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]

    return forward


def _stepper(model: torch.nn.Module, forward: Any, first: torch.Tensor) -> Any:
    device = next(model.parameters()).device

    def step(token: int | None = None) -> torch.Tensor:
        if token is None:
            return first
        return forward(input_ids=torch.tensor([[int(token)]], device=device))

    return step


@contextmanager
def compressed_run(model: torch.nn.Module, prepared: PreparedInputs, session: Session, context: int) -> Iterator[Any]:
    """Prefill ``prepared`` on a fresh cache under ``session`` (compressing the first ``context`` tokens).

    Yields ``step``: call ``step()`` for the next-token logits after the prompt, then
    ``step(token)`` to feed a token and get the logits after it. Query-agnostic runs
    (``context < prepared.length``) prefill the context, compress it, then read the question.
    """
    device = next(model.parameters()).device
    cache = DynamicCache(config=model_config(model).get_text_config(decoder=True))
    inputs = dict(prepared.inputs)
    _reset_rope_state(model)
    forward = _cached_forward(model, session, cache)

    with session.activate(bind=False):
        if context == prepared.length:
            first = forward(**inputs)
        else:
            head = {
                k: (v[:, :context] if k in _PER_TOKEN_KEYS and torch.is_tensor(v) else v) for k, v in inputs.items()
            }
            forward(**head)
            _ensure_rope_state(model, device)
            first = forward(input_ids=inputs["input_ids"][:, context:])
        _ensure_rope_state(model, device)
        yield _stepper(model, forward, first)


@contextmanager
def continued_run(model: torch.nn.Module, session: Session, inputs: dict[str, Any]) -> Iterator[Any]:
    """Feed ``inputs`` (the new tokens of a conversation turn, with their pixels and positions) against the
    cache ``session`` kept from earlier turns, without compressing it again; yields ``step`` as
    :func:`compressed_run` does (docs/methods.md, "Multi-turn: what each method does at a new turn")."""
    if session.cache is None:
        raise ValueError("there is no kept cache to continue: ask a first turn (or re-read the conversation)")
    forward = _cached_forward(model, session, session.cache)
    with session.activate(bind=False):
        first = forward(**inputs)
        yield _stepper(model, forward, first)


def _run(
    model: torch.nn.Module,
    processor: Any,
    prepared: PreparedInputs,
    session: Session,
    run: AbstractContextManager[Any],
    max_new_tokens: int,
    sampling: Sampling,
    generation: Generation,
    scores: list[torch.Tensor] | None = None,
) -> Iterator[str]:
    """The decode loop over ``run``'s steps: yields text deltas, then sets ``generation.result``."""
    tokenizer = getattr(processor, "tokenizer", processor)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    eos = _eos_ids(model, tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    ids: list[int] = []
    pieces: list[str] = []
    text = ""
    with run as step:
        logits = step()
        for i in range(max_new_tokens):
            if scores is not None:
                scores.append(logits.float().cpu())
            token = _select(logits, sampling.do_sample, sampling.temperature, sampling.top_p, generator)
            ids.append(token)
            new_text = tokenizer.decode(ids, skip_special_tokens=True)
            piece = ""
            if new_text != text:
                piece = new_text[len(text) :] if new_text.startswith(text) else new_text
                yield piece
                text = new_text
            elif token in special:
                piece = _token_string(tokenizer, token)
            pieces.append(piece)
            if token in eos or i == max_new_tokens - 1:
                break
            logits = step(token)
    trace = session.trace
    assert trace is not None  # set by the prefill (or by Session.begin_turn for a continued turn)
    trace.prompt_length = prepared.length
    trace.answer = text
    trace.generated_ids = ids
    trace.generated_tokens = pieces
    generation.result = GenerationResult(text=text, token_ids=ids, trace=trace, prepared=prepared)


def forced_logits(
    model: torch.nn.Module,
    prepared: PreparedInputs,
    method: str | Method,
    budget: float | int,
    forced_ids: list[int],
    *,
    query_aware: bool = True,
    **method_params: Any,
) -> torch.Tensor:
    """Teacher forcing: ``[T, V]`` fp32 CPU next-token logits along ``forced_ids`` under ``method``.

    Row ``t`` is the distribution the model gives *before* ``forced_ids[t]``, with the cache compressed
    exactly as :func:`generate` does (used for next-token KL against the Full cache).
    """
    if not forced_ids:
        return torch.zeros(0, 0)
    session, context = _session_for(
        model, prepared, method, budget, query_aware, record_attention=False, method_params=method_params
    )
    rows = []
    with compressed_run(model, prepared, session, context) as step:
        rows.append(step().float().cpu())
        for token in forced_ids[:-1]:
            rows.append(step(token).float().cpu())
    return torch.stack(rows)
