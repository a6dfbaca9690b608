"""``mmkv.Conversation``: a chat that keeps its compressed KV cache between turns.

The first turn is :func:`mmkv.generate` (prefill, compress, decode). Each later turn builds the whole
conversation's token ids with the processor's chat template (earlier user turns, the answers as
generated, the new user turn), checks that the tokens already in the cache are a prefix of them, and
feeds only the rest — the template's end of the previous answer, the new user turn and its images or
video — against the kept cache. Positions stay logical: a later token gets the position a read of the
whole conversation gives it (Qwen's M-RoPE ids included). What each method does with the kept cache at
a new turn is its :class:`TurnPolicy` (docs/methods.md, "Multi-turn: what each method does at a new turn")::

    conv = mmkv.Conversation(model, processor, method="snapkv", budget=0.3)
    conv.ask("Which image has the red circle?", images=["a.png", "b.png"]).text
    conv.ask("And what colour is the square?").text      # prefills only this turn's tokens
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from ..cache.layers import cache_bytes, kept_positions
from ..inputs.modality import ModalityMap
from ..inputs.prompt import Media, chat
from ..methods import Method, make_method
from ..models import PreparedInputs, adapter_for
from ..models.base import Chat, common_prefix_length
from ..trace.core import Timings, Trace
from .driver import (
    _PER_TOKEN_KEYS,
    Generation,
    GenerationResult,
    Sampling,
    _eos_ids,
    _run,
    check_prompt_length,
    continued_run,
    start_generation,
)
from .session import Session


class TurnPolicy(str, Enum):
    """What a method does with the kept cache when a new turn arrives (docs/methods.md, "Multi-turn").

    - ``APPEND``: the kept cache stays as it is; the new turn's tokens are appended uncompressed.
    - ``COMPRESS_NEW``: the new turn's context is compressed with the method's budget, old tokens untouched.
    - ``RESCORE``: everything kept is scored again with the new question (query-aware scorers).

    Only ``APPEND`` is implemented; the other two are named so that a caller asking for them is told so.
    """

    APPEND = "append"
    COMPRESS_NEW = "compress_new"
    RESCORE = "rescore"


IMPLEMENTED_POLICIES = frozenset({TurnPolicy.APPEND})


def default_turn_policy(method: str | Method) -> TurnPolicy:
    """The policy a method gets when none is asked for: ``APPEND`` for every method.

    Why (docs/methods.md, "Multi-turn"): a query-aware scorer (SnapKV, PyramidKV, AdaKV, LOOK-M, MEDA,
    MadaKV's window) chose the kept tokens with the first question; SCBench (arXiv 2412.10319) finds such
    methods lose on follow-ups about something else. Re-scoring with the next question can only evict
    more of what the first one did not need, so the kept cache is never shrunk again by default.
    """
    return TurnPolicy.APPEND


@dataclass
class TurnResult(GenerationResult):
    """One turn's answer (as :class:`GenerationResult`) and the facts of the turn.

    ``prefilled``: tokens read this turn before decoding (the whole conversation when re-read);
    ``cache_length``: logical tokens the cache has seen after the turn (positions go on from here);
    ``held_tokens``: tokens physically held after the turn, summed over layers and KV heads;
    ``cache_bytes``: physical KV bytes held after the turn (:func:`mmkv.cache_bytes`);
    ``prefill_s``: time of this turn's prefill forwards; ``reread``: the conversation was read from
    scratch; ``retokenized``: the template tokenizes an earlier answer differently from the tokens the model
    generated, so the conversation keeps the generated tokens (see :meth:`Conversation.ask`);
    ``scores``: per step, the next-token logits (fp32, CPU) when asked for with ``output_scores``.
    """

    turn: int = 1
    prefilled: int = 0
    cache_length: int = 0
    held_tokens: int = 0
    cache_bytes: int = 0
    prefill_s: float = 0.0
    reread: bool = False
    retokenized: bool = False
    scores: list[torch.Tensor] | None = None


def _common_suffix_length(a: list[int], b: list[int]) -> int:
    return common_prefix_length(a[::-1], b[::-1])


def _per_token_values(key: str, ids: list[int], like: torch.Tensor) -> torch.Tensor:
    """Per-token input ``key`` for plain text tokens ``ids`` (generated answer tokens)."""
    if key == "input_ids":
        return torch.tensor([ids], dtype=like.dtype, device=like.device)
    fill = 1 if key == "attention_mask" else 0
    return torch.full((1, len(ids)), fill, dtype=like.dtype, device=like.device)


def _splice_maps(head: ModalityMap, extra: int, full: ModalityMap, tail_from: int) -> ModalityMap:
    """``head``'s map, ``extra`` text tokens, then ``full``'s tokens from ``tail_from`` on (items renumbered)."""
    n_head_items = len(head.items)
    if len(full) and sum(1 for it in full.items if it.start < tail_from) != n_head_items:
        raise ValueError(
            "the conversation's images and videos do not line up with the kept cache's: ask with reread=True"
        )
    shift = len(head) + extra - tail_from
    items = list(head.items) + [dataclasses.replace(it, start=it.start + shift) for it in full.items[n_head_items:]]
    text = ModalityMap.text_only(extra)
    parts = (
        head,
        text,
        ModalityMap(full.modality[tail_from:], full.item[tail_from:], full.row[tail_from:], full.col[tail_from:]),
    )
    return ModalityMap(
        torch.cat([p.modality for p in parts]),
        torch.cat([p.item for p in parts]),
        torch.cat([p.row for p in parts]),
        torch.cat([p.col for p in parts]),
        items,
    )


class TurnStream:
    """A turn being answered: iterate for the text deltas; :attr:`result` is set when the answer ends."""

    def __init__(self, generation: Generation, finish: Any) -> None:
        self._generation, self._finish = generation, finish
        self.result: TurnResult | None = None

    def __iter__(self) -> Iterator[str]:
        if self.result is not None:  # already answered: nothing more to stream
            return
        yield from self._generation
        assert self._generation.result is not None
        self.result = self._finish(self._generation.result)  # once: the conversation takes the turn here

    def run(self) -> TurnResult:
        """Read the rest of the answer (if any) and return the turn's result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Conversation:
    """A multi-turn chat with one compressed KV cache kept across turns (batch size 1).

    ``method``/``budget``/``method_params`` as in :func:`mmkv.generate` (the first turn is exactly that
    call); ``turn_policy`` what the method does with the kept cache at a later turn (default:
    :func:`default_turn_policy`). Call :meth:`ask` per turn, :meth:`reset` to free the cache.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        method: str | Method = "snapkv",
        budget: float | int = 0.2,
        *,
        turn_policy: TurnPolicy | str | None = None,
        query_aware: bool = True,
        num_frames: int | None = 8,
        video_fps: float | None = None,
        record_attention: bool = True,
        **method_params: Any,
    ) -> None:
        self.model, self.processor = model, processor
        self.method = make_method(method, **method_params)  # refuses bad names / parameters before any work
        self.budget = budget
        try:
            policy = TurnPolicy(turn_policy) if turn_policy is not None else default_turn_policy(self.method)
        except ValueError:
            raise ValueError(
                f"unknown turn_policy {turn_policy!r}: use one of {[p.value for p in TurnPolicy]}"
            ) from None
        if policy not in IMPLEMENTED_POLICIES:
            raise ValueError(
                f"turn_policy {policy.value!r} is not implemented yet (docs/methods.md, 'Multi-turn'): use 'append'"
            )
        self.turn_policy = policy
        self.query_aware = query_aware
        self.num_frames, self.video_fps = num_frames, video_fps
        self.record_attention = record_attention
        self.adapter = adapter_for(model)
        self._eos = _eos_ids(model, getattr(processor, "tokenizer", processor))
        self.reset()

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation and free its cache (every reference to the cache layers is dropped)."""
        session = getattr(self, "_session", None)
        if session is not None:
            session.cache = None
        self._session: Session | None = None
        self.history: Chat = []
        self.turns = 0
        self._ids: list[int] = []  # tokens in the kept cache, in order
        self._per_token: dict[str, torch.Tensor] = {}  # their per-token model inputs (input_ids, masks, ...)
        self._map: ModalityMap | None = None  # their modality map
        self._pending: list[int] = []  # the last answer token: generated, never fed
        self._last_answer = ""
        gc.collect()

    def start_from(self, history: Chat) -> None:
        """Forget the cache and continue after ``history`` (earlier user/assistant turns, as :func:`mmkv.chat`
        builds them): the next :meth:`ask` reads them all from scratch, then keeps that cache (e.g. after a
        change of method or budget, or after the oldest turns were dropped)."""
        self.reset()
        self.history = list(history)
        self.turns = sum(1 for m in history if m.get("role") == "user")

    @property
    def cache(self) -> Any:
        """The kept cache (a transformers ``DynamicCache`` with mmkv layers), or None."""
        return None if self._session is None else self._session.cache

    @property
    def cache_bytes(self) -> int:
        """Physical KV bytes the kept cache holds (0 after :meth:`reset`)."""
        return 0 if self.cache is None else cache_bytes(self.cache)

    # ---- a turn --------------------------------------------------------------------------------
    def ask(
        self,
        question: str,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        *,
        media: Sequence[Media] | None = None,
        max_new_tokens: int = 64,
        reread: bool = False,
        sampling: Sampling | None = None,
        output_scores: bool = False,
    ) -> TurnResult:
        """:meth:`stream`, run to the end: the turn's :class:`TurnResult`."""
        return self.stream(
            question,
            images,
            videos,
            media=media,
            max_new_tokens=max_new_tokens,
            reread=reread,
            sampling=sampling,
            output_scores=output_scores,
        ).run()

    def stream(
        self,
        question: str,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        *,
        media: Sequence[Media] | None = None,
        max_new_tokens: int = 64,
        reread: bool = False,
        sampling: Sampling | None = None,
        output_scores: bool = False,
    ) -> TurnStream:
        """Answer ``question`` (with new ``images``/``videos``/``media``, as :func:`mmkv.chat`) in context.

        A later turn feeds only its new tokens against the kept cache; ``reread=True`` reads the whole
        conversation from scratch instead (compressing it as a first turn, the new cache is kept). The
        conversation's tokens are those the model saw and generated: when the template tokenizes an earlier
        answer differently, they are kept as generated and the template's tokens after that answer are
        appended (``result.retokenized``; a re-read reads these same tokens). Raises ``ValueError`` when
        the conversation outgrows the model's context, or when the family cannot attach new media to a kept
        cache (see :meth:`~mmkv.models.base.ModelAdapter.media_suffix`); the conversation is then unchanged.
        Iterate the returned :class:`TurnStream` for the answer's text deltas; its ``result`` is set at the end
        (the conversation takes the turn only when the answer is complete).
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        sampling = sampling or Sampling()
        message = chat(question, images, videos, media=media)[0]
        new_images = sum(1 for p in message["content"] if p["type"] == "image")
        new_videos = sum(1 for p in message["content"] if p["type"] == "video")
        full = self.adapter.prepare(
            self.model, self.processor, [*self.history, message], num_frames=self.num_frames, video_fps=self.video_fps
        )
        continuing = self._session is not None and not reread
        if continuing:  # refuses new media the family cannot attach to a kept cache, before any work
            self.adapter.media_suffix(full, new_images, new_videos)
        prepared, retokenized = full, False
        if self._session is not None:
            try:
                prepared, retokenized = self._conversation_inputs(full, message)
            except ValueError:
                if continuing:
                    raise
                retokenized = True  # a re-read reads the template's encoding of the conversation

        self._check_length(prepared.length, max_new_tokens)
        scores: list[torch.Tensor] | None = [] if output_scores else None
        if not continuing:
            generation, session = start_generation(
                self.model,
                self.processor,
                prepared,
                self.method,
                self.budget,
                max_new_tokens=max_new_tokens,
                query_aware=self.query_aware,
                sampling=sampling,
                record_attention=self.record_attention,
                scores=scores,
            )
            start = 0
        else:
            assert self._session is not None  # continuing
            session, start = self._session, len(self._ids)
            inputs = self._suffix_inputs(prepared, start, new_images, new_videos)
            assert session.trace is not None  # set by the first turn's prefill
            session.begin_turn(self._turn_trace(session.trace, prepared))
            generation = Generation(iter(()))
            run = continued_run(self.model, session, inputs)
            generation._steps = _run(
                self.model, self.processor, prepared, session, run, max_new_tokens, sampling, generation, scores
            )

        def finish(result: GenerationResult) -> TurnResult:
            self._session = session
            self._remember(prepared, result, message)
            cache = session.cache
            held = sum(int(p.numel()) for i in range(len(cache.layers)) for p in kept_positions(cache, i))
            return TurnResult(
                **vars(result),
                turn=self.turns,
                prefilled=prepared.length - start,
                cache_length=int(cache.get_seq_length()),
                held_tokens=held,
                cache_bytes=cache_bytes(cache),
                prefill_s=result.trace.timings.prefill_s,
                reread=start == 0 and self.turns > 1,
                retokenized=retokenized,
                scores=scores,
            )

        return TurnStream(generation, finish)

    def reread(
        self, question: str, images: Sequence[Any] = (), videos: Sequence[Any] = (), **kwargs: Any
    ) -> TurnResult:
        """:meth:`ask` with ``reread=True``: read the whole conversation from scratch (the oracle of a kept cache)."""
        return self.ask(question, images, videos, reread=True, **kwargs)

    # ---- helpers -------------------------------------------------------------------------------
    def _check_length(self, length: int, max_new_tokens: int) -> None:
        try:
            check_prompt_length(self.model, length, max_new_tokens)
        except ValueError as error:
            if not self.history:
                raise
            raise ValueError(
                f"{error}. The conversation is too long to continue: start over with conv.reset() and ask again "
                "without the oldest turns (or with fewer images), or lower max_new_tokens"
            ) from None

    def _conversation_inputs(self, full: PreparedInputs, message: dict[str, Any]) -> tuple[PreparedInputs, bool]:
        """The whole conversation's inputs: ``full`` (the template's encoding) when the kept tokens and the
        unfed last answer token are its prefix, else the kept tokens spliced with the template's tokens
        after the last answer (found as the common suffix of ``full`` and a probe with another answer)."""
        head = self._ids + self._pending
        ids = full.input_ids[0].tolist()
        if ids[: len(head)] == head:
            return full, False
        probe_answer = "1" if self._last_answer.endswith("0") else "0"
        probe_history = [*self.history[:-1], {"role": "assistant", "content": [{"type": "text", "text": probe_answer}]}]
        probe = self.adapter.prepare(
            self.model,
            self.processor,
            [*probe_history, message],
            num_frames=self.num_frames,
            video_fps=self.video_fps,
        )
        tail_from = len(ids) - _common_suffix_length(ids, probe.input_ids[0].tolist())
        inputs = dict(full.inputs)
        for key, value in full.inputs.items():
            if key in _PER_TOKEN_KEYS and torch.is_tensor(value):
                kept = self._per_token.get(key)
                if kept is None:
                    kept = _per_token_values(key, self._ids, value)
                extra = _per_token_values(key, self._pending, value)
                inputs[key] = torch.cat([kept, extra, value[:, tail_from:]], dim=1)
        assert self._map is not None  # kept with the first turn
        modality = _splice_maps(self._map, len(self._pending), full.modality, tail_from)
        length = int(inputs["input_ids"].shape[1])
        context = min(length, max(len(head), full.context_length - tail_from + len(head)))
        spliced = PreparedInputs(inputs, modality, context, images=full.images, videos=full.videos)
        return spliced, True

    def _suffix_inputs(self, prepared: PreparedInputs, start: int, images: int, videos: int) -> dict[str, Any]:
        """Forward inputs for tokens ``start:`` of ``prepared``: ids, their per-token inputs, the new media's
        pixels, and (M-RoPE) their position ids."""
        if prepared.input_ids[0, :start].tolist() != self._ids:
            raise ValueError("the kept cache is not a prefix of the conversation: ask with reread=True")
        inputs: dict[str, Any] = {
            k: v[:, start:]
            for k, v in prepared.inputs.items()
            if k in _PER_TOKEN_KEYS and k != "attention_mask" and torch.is_tensor(v)
        }
        inputs.update(self.adapter.media_suffix(prepared, images, videos))
        position_ids = self.adapter.suffix_position_ids(self.model, prepared, start)
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        return inputs

    @staticmethod
    def _turn_trace(previous: Trace, prepared: PreparedInputs) -> Trace:
        """A later turn's trace: the kept layers' decisions (from the compression) with this turn's facts."""
        return dataclasses.replace(
            previous,
            prompt_length=prepared.length,
            modality=prepared.modality,
            layers=[copy.copy(layer) for layer in previous.layers],
            timings=Timings(),
            answer="",
            generated_ids=[],
            generated_tokens=[],
            step_bytes=[],
            step_lengths=[],
            bytes_end=0,
            host_bytes_end=0,
        )

    def _remember(self, prepared: PreparedInputs, result: GenerationResult, message: dict[str, Any]) -> None:
        """After a turn: the cache holds ``prepared``'s tokens and every answer token but the last."""
        fed = result.token_ids[:-1]
        self._ids = prepared.input_ids[0].tolist() + fed
        self._per_token = {
            k: torch.cat([v, _per_token_values(k, fed, v)], dim=1)
            for k, v in prepared.inputs.items()
            if k in _PER_TOKEN_KEYS and torch.is_tensor(v)
        }
        self._map = _splice_maps(prepared.modality, len(fed), ModalityMap.text_only(0), 0) if fed else prepared.modality
        last = result.token_ids[-1:]
        self._pending = [t for t in last if t not in self._eos]
        self._last_answer = result.text
        self.history = [
            *self.history,
            message,
            {"role": "assistant", "content": [{"type": "text", "text": result.text}]},
        ]
        self.turns += 1
