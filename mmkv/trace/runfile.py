"""Run files: one finished run (its Trace, thumbnails of its images and video frames, its prompt tokens)
in one file that the app's Inspect and Compare open without the model.

    result = mmkv.generate(model, processor, chat, "snapkv", 0.2)
    mmkv.save_run(result, "needle.mmkvrun", processor, question="Which image has the red circle?")
    run = mmkv.load_run("needle.mmkvrun")          # no model, no GPU: run.trace, run.images, run.videos, run.tokens

``mmkv run ... --save needle.mmkvrun`` writes the same file from the command line.

Format (``.mmkvrun``, format version 1): a zip archive, chosen over gzip-compressed JSON because the
thumbnails go in as they are (no base64: a third smaller), every member carries a CRC (a damaged copy
is detected, not half-read), any unzip tool lists and shows its contents, and the manifest can be read
without decoding the trace. Its members:

- ``mmkv-run.json``: ``{"format": "mmkv-run", "format_version", "mmkv_version", "created", "label",
  "model", "question", "answer", "tokens", "agreement", "summary", "images", "videos", "thumbnails"}``;
  each image / frame entry names its thumbnail member and its original pixel size.
- ``trace.json``: :meth:`Trace.to_dict`, except that long lists of numbers (kept positions, scores)
  are stored in ``trace.bin`` and replaced by ``{"__mmkv_array__": encoding, "dtype", "n", "offset",
  "nbytes"}``; encodings are ``raw`` (smallest integer type, or float32 when exact), ``delta``
  (increasing integers as the first one, ``"first"``, and the differences) and ``bits`` (increasing non-negative integers as a bitmap); a
  list of equally long short rows of numbers (per-head shares) is one ``raw`` array with a ``"shape"``.
  Loading gives back exactly the same dict, so fields added to the Trace later travel unchanged.
- ``media/image-K.webp``, ``media/video-V-frame-F.webp``: RGB thumbnails with the original aspect ratio
  (the overlays lay each item's token grid over the whole picture, so only the aspect ratio matters),
  longest side at most 448 px for images and 224 px for video frames by default; never enlarged.
  WebP: lossless for pictures of at most 2,048 colours (drawings, the bundled model's shapes), else
  lossy at quality 85 (photos); ``codec="png"`` keeps every pixel of every picture.

The Trace fields are described in ``docs/methods.md`` (what each method records).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from .._version import __version__
from ..inputs.video import VideoFrames
from .core import Trace

__all__ = ["RunFile", "save_run", "load_run", "peek_run", "example_runs", "RUNS_DIR", "SUFFIX", "FORMAT_VERSION"]

FORMAT = "mmkv-run"
FORMAT_VERSION = 1
SUFFIX = ".mmkvrun"
MANIFEST, TRACE, BLOB = "mmkv-run.json", "trace.json", "trace.bin"
#: The example runs shipped with the package (``scripts/make_runs.py``; ``index.json`` describes them).
RUNS_DIR = Path(__file__).resolve().parents[1] / "assets" / "runs"
IMAGE_SIDE, FRAME_SIDE = 448, 224
_MARK = "__mmkv_array__"
_MIN_ARRAY = 16  # shorter lists stay plain JSON
_FLAT_COLOURS = 2048  # "auto" stores pictures with at most this many colours losslessly


# ---- the trace: JSON with long numeric lists in one binary blob ------------------------------------
class _Blob:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> tuple[int, int]:
        offset = self.size
        self.parts.append(data)
        self.size += len(data)
        return offset, len(data)


def _int_dtype(lo: int, hi: int) -> str:
    for code, info in (
        ("u1", np.iinfo(np.uint8)),
        ("i1", np.iinfo(np.int8)),
        ("u2", np.iinfo(np.uint16)),
        ("i2", np.iinfo(np.int16)),
        ("u4", np.iinfo(np.uint32)),
        ("i4", np.iinfo(np.int32)),
    ):
        if info.min <= lo and hi <= info.max:
            return code
    return "i8"


def _encode_ints(values: list[int], blob: _Blob, raw_only: bool = False) -> dict[str, Any] | None:
    try:
        a = np.asarray(values, dtype=np.int64)
    except OverflowError:
        return None  # beyond int64: plain JSON
    n = len(values)
    dtype = _int_dtype(int(a.min()), int(a.max()))
    best = ("raw", dtype, a.astype("<" + dtype).tobytes())
    d = np.diff(a)
    if d.size and int(d.min()) > 0 and not raw_only:  # strictly increasing: positions
        ddt = _int_dtype(int(d.min()), int(d.max()))
        delta = d.astype("<" + ddt).tobytes()
        if len(delta) < len(best[2]):
            best = ("delta", ddt, delta)
        if int(a[0]) >= 0 and (int(a[-1]) + 8) // 8 < len(best[2]):
            bits = np.zeros(int(a[-1]) + 1, dtype=bool)
            bits[a] = True
            best = ("bits", "u1", np.packbits(bits).tobytes())
    enc, dt, data = best
    offset, nbytes = blob.add(data)
    out = {_MARK: enc, "dtype": dt, "n": n, "offset": offset, "nbytes": nbytes}
    if enc == "delta":
        out["first"] = int(a[0])
    return out


def _encode_floats(values: list[float], blob: _Blob) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        exact32 = np.array_equal(a.astype(np.float32).astype(np.float64), a, equal_nan=True)
    dt = "f4" if exact32 else "f8"
    offset, nbytes = blob.add(a.astype("<" + dt).tobytes())
    return {_MARK: "raw", "dtype": dt, "n": len(values), "offset": offset, "nbytes": nbytes}


def _numbers(values: Any, blob: _Blob, raw_only: bool = False) -> dict[str, Any] | None:
    """``values`` (a flat list) packed into ``blob``, or None when it is not all ints or all floats."""
    if all(type(v) is int for v in values):
        return _encode_ints(values, blob, raw_only)
    if all(type(v) is float for v in values):
        return _encode_floats(values, blob)
    return None


def _pack(value: Any, blob: _Blob) -> Any:
    if isinstance(value, dict):
        return {k: _pack(v, blob) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) >= _MIN_ARRAY:
            packed = _numbers(list(value), blob)
            if packed is not None:
                return packed
        if value and all(isinstance(v, (list, tuple)) for v in value):  # a matrix of short rows (per-head shares)
            width = len(value[0])
            if 0 < width < _MIN_ARRAY and len(value) * width >= _MIN_ARRAY and all(len(v) == width for v in value):
                packed = _numbers([x for v in value for x in v], blob, raw_only=True)
                if packed is not None:
                    return {**packed, "shape": [len(value), width]}
        return [_pack(v, blob) for v in value]
    return value


def _unpack(value: Any, blob: bytes) -> Any:
    if isinstance(value, dict):
        if _MARK not in value:
            return {k: _unpack(v, blob) for k, v in value.items()}
        try:
            enc, dt, n, offset, nbytes = (
                value[_MARK],
                value["dtype"],
                int(value["n"]),
                int(value["offset"]),
                int(value["nbytes"]),
            )
            if offset < 0 or nbytes < 0 or offset + nbytes > len(blob):
                raise ValueError("array outside trace.bin")
            raw = np.frombuffer(blob, dtype="<" + dt, count=nbytes // np.dtype(dt).itemsize, offset=offset)
            if enc == "bits":
                out: np.ndarray = np.nonzero(np.unpackbits(raw))[0]
            elif enc == "delta":
                out = np.cumsum(np.concatenate([[int(value["first"])], raw.astype(np.int64)]))
            elif enc == "raw":
                out = raw.astype(np.float64 if raw.dtype.kind == "f" else np.int64)
            else:
                raise ValueError(f"unknown array encoding {enc!r}")
            if out.size != n:
                raise ValueError(f"array holds {out.size} values, expected {n}")
            if "shape" in value:
                out = out.reshape([int(x) for x in value["shape"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise _Corrupt(f"a packed array in {TRACE} is damaged ({exc})") from None
        return out.tolist()
    if isinstance(value, list):
        return [_unpack(v, blob) for v in value]
    return value


class _Corrupt(Exception):
    pass


# ---- thumbnails -------------------------------------------------------------------------------------
def thumbnail(img: Image.Image, side: int) -> Image.Image:
    """RGB copy of ``img`` with its longest side at most ``side`` px (aspect ratio kept; never enlarged)."""
    img = img.convert("RGB")
    w, h = img.size
    if max(w, h) <= side:
        return img.copy()
    scale = side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def _encode_image(img: Image.Image, codec: str, quality: int) -> tuple[bytes, str]:
    def save(**kw: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, **kw)
        return buf.getvalue()

    if codec == "png":
        return save(format="PNG", optimize=True), "png"
    if codec == "auto" and img.getcolors(maxcolors=_FLAT_COLOURS) is not None:  # flat drawing: lossless is small
        return save(format="WEBP", lossless=True, quality=80, method=4), "webp"
    return save(format="WEBP", quality=quality, method=4), "webp"


# ---- the run ----------------------------------------------------------------------------------------
@dataclass
class RunFile:
    """One run as the app shows it: the fields of the app's ``Run`` plus its question and provenance.

    ``images`` and ``videos`` (:class:`~mmkv.models.base.VideoFrames`) are the full pictures when made
    by :meth:`from_result`, the thumbnails once loaded. ``tokens`` are the prompt tokens as strings
    (one per prompt position, as the app's token strip shows them).
    """

    trace: Trace
    images: list[Image.Image] = field(default_factory=list)
    videos: list[VideoFrames] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    question: str = ""
    answer: str = ""
    model: str = ""
    label: str = ""
    agreement: dict[str, Any] | None = None
    created: str = ""  # ISO 8601, UTC
    mmkv_version: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_result(
        cls,
        result: Any,
        processor: Any,
        *,
        question: str | None = None,
        label: str | None = None,
        model: str | None = None,
        agreement: dict[str, Any] | None = None,
    ) -> RunFile:
        """A run file for a :class:`~mmkv.GenerationResult`; ``processor`` turns prompt ids into token strings."""
        tok = getattr(processor, "tokenizer", processor)
        prepared = result.prepared
        tokens = [tok.decode([i]) for i in prepared.input_ids.reshape(-1).tolist()]
        trace = result.trace
        return cls(
            trace=trace,
            images=list(prepared.images),
            videos=list(prepared.videos),
            tokens=tokens,
            question=question or "",
            answer=result.text,
            model=model or _model_name(trace.model),
            label=label or default_label(trace),
            agreement=agreement,
        )

    def app_fields(self) -> dict[str, Any]:
        """Keyword arguments for the app's ``mmkv.ui.handlers.Run``."""
        return {
            "label": self.label,
            "trace": self.trace,
            "images": list(self.images),
            "videos": list(self.videos),
            "tokens": list(self.tokens),
            "answer": self.answer,
            "model": self.model,
            "agreement": self.agreement,
        }

    # ---- writing -------------------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike,
        *,
        image_side: int = IMAGE_SIDE,
        frame_side: int = FRAME_SIDE,
        codec: str = "auto",
        quality: int = 85,
    ) -> Path:
        """Write the run to ``path`` (replaced atomically); returns the path. Suffix ``.mmkvrun`` by convention.

        ``image_side`` / ``frame_side``: longest thumbnail side in px; ``codec``: ``"auto"`` (WebP,
        lossless for pictures of few colours), ``"webp"`` (lossy, ``quality``) or ``"png"`` (lossless).
        """
        if codec not in ("auto", "webp", "png"):
            raise ValueError(f"codec must be 'auto', 'webp' or 'png', got {codec!r}")
        if min(image_side, frame_side) < 16:
            raise ValueError("thumbnail sides must be at least 16 px")
        self._check_media(self.images, self.videos)

        created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        members: list[tuple[str, bytes, int]] = []
        images, videos = [], []
        for k, img in enumerate(self.images):
            small = thumbnail(img, image_side)
            data, ext = _encode_image(small, codec, quality)
            name = f"media/image-{k}.{ext}"
            members.append((name, data, zipfile.ZIP_STORED))
            images.append({"file": name, "size": list(small.size), "original_size": list(img.size)})
        for v, video in enumerate(self.videos):
            frames = []
            for f, frame in enumerate(video.frames):
                small = thumbnail(frame, frame_side)
                data, ext = _encode_image(small, codec, quality)
                name = f"media/video-{v}-frame-{f}.{ext}"
                members.append((name, data, zipfile.ZIP_STORED))
                frames.append({"file": name, "size": list(small.size), "original_size": list(frame.size)})
            videos.append(
                {
                    "frames": frames,
                    "timestamps": [float(t) for t in video.timestamps],
                    "fps": float(video.fps),
                    "duration": None if video.duration is None else float(video.duration),
                }
            )
        blob = _Blob()
        trace_json = json.dumps(_pack(self.trace.to_dict(), blob), separators=(",", ":"))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mmkv_version": __version__,
            "created": created,
            "label": self.label,
            "model": self.model,
            "question": self.question,
            "answer": self.answer,
            "agreement": self.agreement,
            "summary": self.trace.summary(),
            "thumbnails": {"image_side": image_side, "frame_side": frame_side, "codec": codec, "quality": quality},
            "images": images,
            "videos": videos,
            "tokens": list(self.tokens),
        }
        members[:0] = [
            (MANIFEST, json.dumps(manifest, indent=1).encode(), zipfile.ZIP_DEFLATED),
            (TRACE, trace_json.encode(), zipfile.ZIP_DEFLATED),
            (BLOB, b"".join(blob.parts), zipfile.ZIP_DEFLATED),
        ]
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".mmkvrun-", dir=target.parent if str(target.parent) else ".")
        try:
            with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
                for name, data, method in members:
                    info = zipfile.ZipInfo(name, date_time=_zip_time(created))
                    info.external_attr = 0o644 << 16
                    zf.writestr(
                        info, data, compress_type=method, compresslevel=9 if method == zipfile.ZIP_DEFLATED else None
                    )
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def _check_media(self, images: Sequence[Any], videos: Sequence[Any]) -> None:
        m = self.trace.modality
        if self.tokens and len(self.tokens) != self.trace.prompt_length:
            raise ValueError(
                f"the run has {len(self.tokens)} prompt tokens but its trace has {self.trace.prompt_length}"
            )
        if m is None:
            return
        for item in m.items:
            have = len(images) if int(item.modality) == 1 else len(videos)
            if int(item.source) >= have:
                kind = "image" if int(item.modality) == 1 else "video"
                raise ValueError(
                    f"the trace has {kind} {item.source + 1} but the run holds {have} {kind}s: "
                    f"pass the result's prepared images and videos"
                )

    # ---- reading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | IO[bytes]) -> RunFile:
        """Read a run file (no model needed). Raises ``ValueError`` saying what is wrong and what to do."""
        where = str(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "the run file")
        zf = _open(path, where)
        with zf:
            try:
                manifest = _manifest(zf, where)

                made_by = manifest.get("mmkv_version", "?")
                try:
                    raw = json.loads(zf.read(TRACE))
                    blob = zf.read(BLOB)
                except KeyError as exc:
                    raise _Corrupt(f"a member is missing ({exc})") from None
                except json.JSONDecodeError as exc:
                    raise _Corrupt(f"{TRACE} is not valid JSON ({exc})") from None
                try:
                    trace = Trace.from_dict(_unpack(raw, blob))
                except (TypeError, KeyError, AttributeError, ValueError) as exc:
                    raise ValueError(
                        f"{where}: its trace cannot be read by this mmkv ({__version__}; the file was made by mmkv "
                        f"{made_by}): {exc}. Upgrade mmkv (pip install -U mmkv) and open it again"
                    ) from None
                images = [_image(zf, e) for e in manifest.get("images", [])]
                videos = [
                    VideoFrames(
                        frames=[_image(zf, fr) for fr in v["frames"]],
                        timestamps=list(v["timestamps"]),
                        fps=float(v["fps"]),
                        duration=v.get("duration"),
                    )
                    for v in manifest.get("videos", [])
                ]
                run = cls(
                    trace=trace,
                    images=images,
                    videos=videos,
                    tokens=list(manifest.get("tokens", [])),
                    question=manifest.get("question", ""),
                    answer=manifest.get("answer", ""),
                    model=manifest.get("model", ""),
                    label=manifest.get("label", ""),
                    agreement=manifest.get("agreement"),
                    created=manifest.get("created", ""),
                    mmkv_version=made_by,
                    format_version=int(manifest["format_version"]),
                )
                try:
                    run._check_media(images, videos)
                except ValueError as exc:
                    raise _Corrupt(str(exc)) from None
                return run
            except (_Corrupt, zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{where}: the run file is truncated or corrupt ({exc}): copy it again, or save the run again"
                ) from None


def _zip_time(created: str) -> tuple[int, int, int, int, int, int]:
    try:
        t = datetime.fromisoformat(created)
        return (max(t.year, 1980), t.month, t.day, t.hour, t.minute, t.second)
    except ValueError:
        return (1980, 1, 1, 0, 0, 0)


def _open(path: Any, where: str) -> zipfile.ZipFile:
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{where}: no such file")
        with open(p, "rb") as fh:
            head = fh.read(4)
    else:
        pos = path.tell()
        head = path.read(4)
        path.seek(pos)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError):
        pass
    if head.startswith(b"PK"):
        raise ValueError(
            f"{where}: the run file is truncated or corrupt (its zip directory is unreadable): "
            f"copy it again, or save the run again"
        )
    hint = ""
    if head[:1] in (b"{", b"[") or head[:2] == b"\x1f\x8b":
        hint = " (it looks like JSON, e.g. a trace from --trace: read that with mmkv.Trace.from_json)"
    raise ValueError(
        f"{where}: not an mmkv run file{hint}; run files ({SUFFIX}) are written by "
        f"`mmkv run ... --save FILE{SUFFIX}`, mmkv.save_run() or the app"
    )


def _manifest(zf: zipfile.ZipFile, where: str) -> dict[str, Any]:
    if MANIFEST not in zf.namelist():
        raise ValueError(
            f"{where}: not an mmkv run file (a zip without {MANIFEST}); run files are written by "
            f"`mmkv run ... --save FILE{SUFFIX}`, mmkv.save_run() or the app"
        )
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except json.JSONDecodeError as exc:
        raise _Corrupt(f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: not an mmkv run file ({MANIFEST} does not say format {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _Corrupt(f"format_version {version!r} is not a positive whole number")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: made by a newer mmkv ({manifest.get('mmkv_version', '?')}, run format {version}); this mmkv "
            f"({__version__}) reads run formats up to {FORMAT_VERSION}: upgrade mmkv (pip install -U mmkv)"
        )
    return manifest


def _image(zf: zipfile.ZipFile, entry: dict[str, Any]) -> Image.Image:
    try:
        with Image.open(io.BytesIO(zf.read(entry["file"]))) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError) as exc:  # PIL raises these for a damaged picture
        raise _Corrupt(f"thumbnail {entry.get('file')!r} cannot be decoded ({exc})") from None


def _model_name(name: str) -> str:
    """``"bundled"`` for the bundled model's directory (a machine-specific path), else the name as given."""
    from ..bundled import BUNDLED_MODEL

    try:
        if name and Path(name).resolve() == BUNDLED_MODEL:
            return "bundled"
    except OSError:
        pass
    return name


def default_label(trace: Trace) -> str:
    if trace.method == "full":
        return "full"
    budget = f"{trace.budget} tok" if isinstance(trace.budget, int) else f"{trace.budget:g}"
    return f"{trace.method} @ {budget}"


# ---- functions ------------------------------------------------------------------------------------
def save_run(
    result: Any,
    path: str | os.PathLike,
    processor: Any = None,
    question: str | None = None,
    *,
    label: str | None = None,
    agreement: dict[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Save a :class:`~mmkv.GenerationResult` (with the ``processor`` that made it) or a :class:`RunFile`.

    ``options`` go to :meth:`RunFile.save` (``image_side``, ``frame_side``, ``codec``, ``quality``).
    """
    if isinstance(result, RunFile):
        run = result
    else:
        if processor is None:
            raise ValueError(
                "save_run needs the processor (or tokenizer) that made the result, to store the prompt tokens"
            )
        run = RunFile.from_result(result, processor, question=question, label=label, agreement=agreement)
    return run.save(path, **options)


def load_run(path: str | os.PathLike | IO[bytes]) -> RunFile:
    """Read a run file written by :func:`save_run` (see :meth:`RunFile.load`)."""
    return RunFile.load(path)


def peek_run(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a run file (label, question, answer, summary, ...) without decoding trace or pictures."""
    where = str(path)
    with _open(path, where) as zf:
        try:
            return _manifest(zf, where)
        except (_Corrupt, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise ValueError(
                f"{where}: the run file is truncated or corrupt ({exc}): copy it again, or save the run again"
            ) from None


def example_runs() -> list[dict[str, Any]]:
    """The shipped example runs: ``{"file" (absolute path), "title", "method", "description", ...}`` per run."""
    index = RUNS_DIR / "index.json"
    if not index.is_file():
        return []
    entries = json.loads(index.read_text(encoding="utf-8"))
    return [{**e, "file": str(RUNS_DIR / e["file"])} for e in entries if (RUNS_DIR / e["file"]).is_file()]
