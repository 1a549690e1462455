"""The mapper stage: decode + preprocess (in DataLoader workers) and the model forward."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsql.ingest.images import ItemRejected, check_vector, clean_caption, content_id, load_image
from clipsql.lazy import torch
from clipsql.models import loading as models


def caption_truncated(tokenizer: Any, caption: str) -> bool:
    """Whether the tokenizer will cut the caption at its context length (SOT + EOT included)."""
    ctx = getattr(tokenizer, "context_length", None)
    if ctx is None:
        return False
    if hasattr(tokenizer, "encode"):          # open_clip SimpleTokenizer
        return len(tokenizer.encode(caption)) + 2 > ctx
    inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer
    if inner is not None:
        return len(inner(caption)["input_ids"]) > ctx
    return False


@dataclass
class Prepared:
    """What one worker hands the main process: a batch ready for the forward pass."""
    rows: list[dict] = field(default_factory=list)        # sample fields (id, uri, caption, width, …)
    pixels: list[Any] = field(default_factory=list)       # preprocessed image tensors
    tokens: list[Any] = field(default_factory=list)       # tokenized captions (tokenized once, here)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)
    image_vectors: list[np.ndarray] = field(default_factory=list)   # precomputed sources
    text_vectors: list[np.ndarray] = field(default_factory=list)
    units_done: list[tuple[str, int, int]] = field(default_factory=list)  # (unit key, rows, rejects)
    read_seconds: float = 0.0
    decode_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.rows)


def identify(item: Any, allow_missing_captions: bool = False) -> str | None:
    """The id an image item will have, from its bytes and caption, without decoding the image;
    None when its caption is rejected (the item's decode reports its faults in their order)."""
    try:
        caption = clean_caption(item.caption_raw)
    except ItemRejected as e:
        if not (allow_missing_captions and e.reason in NO_CAPTION):
            return None
        caption = None
    return item.id or content_id(item.image_bytes or b"", caption or "",
                                 extra="" if item.image_bytes is not None else (item.uri or ""))


def prepare_item(item: Any, *, preprocess: Any, tokenizer: Any, done_ids: frozenset | set,
                 dim: int | None, out: Prepared, allow_missing_captions: bool = False) -> None:
    """Clean, id, skip-or-decode one source item into `out` (a reject is recorded, never raised).

    An image item whose id is in `done_ids` (stored before the run) is not decoded: its row comes
    without pixels or tokens (`stored` set), to be classified and counted as skipped. An image's own
    fault (corrupt, too large, …) is reported before its caption's; with `allow_missing_captions`
    an image without a caption (none, or empty after cleaning) is kept with a NULL caption and
    no text embedding."""
    t0 = time.perf_counter()
    try:
        stored = bool(done_ids) and item.image_bytes is not None and \
            identify(item, allow_missing_captions) in done_ids
        image = load_image(item.image_bytes) if item.image_bytes is not None and not stored else None
        try:
            caption = clean_caption(item.caption_raw)
        except ItemRejected as e:
            if not (allow_missing_captions and e.reason in NO_CAPTION):
                raise
            caption = None
        sid = item.id or content_id(item.image_bytes or b"", caption or "",
                                    extra="" if item.image_bytes is not None else (item.uri or ""))
        row = {"id": sid, "uri": item.uri, "caption": caption, "caption_text": source_text(item.caption_raw, caption),
               "width": None, "height": None,
               "location": item.location, "caption_truncated": caption_truncated(tokenizer, caption)
               if tokenizer is not None and caption is not None else False, "meta": item.meta or {}}
        if stored:
            row["stored"] = True
            out.pixels.append(None)
            out.tokens.append(None)
        elif image is None:   # precomputed embeddings
            if item.image_embedding is None or item.text_embedding is None:
                raise ItemRejected("missing_vector", "row has no image or text embedding")
            img = check_vector(item.image_embedding, dim)
            txt = check_vector(item.text_embedding, dim)
            out.image_vectors.append(img)
            out.text_vectors.append(txt)
        else:
            row["width"], row["height"] = image.size
            pixels = preprocess(image)
            tokens = tokenizer([caption])[0] if caption is not None else None
            out.pixels.append(pixels)        # appended together: rows, pixels and tokens stay aligned
            out.tokens.append(tokens)
        out.rows.append(row)
    except ItemRejected as e:
        out.rejects.append((item.location, e.reason, e.detail))
    except Exception as e:  # noqa: BLE001 - one bad item never aborts the run
        out.rejects.append((item.location, "unexpected_error", f"{e.__class__.__name__}: {e}"[:500]))
    finally:
        out.decode_seconds += time.perf_counter() - t0


NO_CAPTION = ("missing_caption", "empty_caption")   # what --allow-missing-captions keeps


def source_text(raw: Any, caption: str | None) -> str | None:
    """The caption as the source gave it (decoded, before cleaning), which the caption features
    count; None when the row keeps no caption."""
    if caption is None:
        return None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        return raw[3 if raw.startswith(b"\xef\xbb\xbf") else 0:].decode("utf-8")   # clean_caption checked it
    return raw if isinstance(raw, str) else caption


def open_clip_encoder(spec: Any, device: str) -> "Encoder":
    """The default encoder factory of an ingest (IngestOptions.encoder_factory): the open_clip
    model with its weights (models.load) and its forward."""
    return Encoder(models.load(spec, device))


class Encoder:
    """Runs the open_clip towers (normalize=False: raw vectors are stored)."""

    def __init__(self, loaded: Any):
        self.loaded = loaded

    def __call__(self, pixels: list[Any], tokens: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) vectors; a row without tokens (no caption) gets a NaN text row (NULL)."""
        lm = self.loaded
        images = torch.stack(pixels).to(lm.device, non_blocking=True)
        have = [i for i, t in enumerate(tokens) if t is not None]
        use_amp = lm.device.startswith("cuda")
        with torch.no_grad(), torch.autocast(device_type="cuda", enabled=use_amp):
            img = lm.model.encode_image(images, normalize=False).float().cpu().numpy()
            if len(have) == len(tokens):
                txt = lm.model.encode_text(torch.stack(tokens).to(lm.device, non_blocking=True), normalize=False)
                txt = txt.float().cpu().numpy()
            else:
                txt = np.full(img.shape, np.nan, dtype=np.float32)
                if have:
                    part = torch.stack([tokens[i] for i in have]).to(lm.device, non_blocking=True)
                    txt[have] = lm.model.encode_text(part, normalize=False).float().cpu().numpy()
        return img.astype(np.float32, copy=False), txt.astype(np.float32, copy=False)

    def text(self, tokens: list[Any]) -> np.ndarray:
        """The text tower alone (`ingest --update` re-encodes changed captions)."""
        lm = self.loaded
        if not tokens:
            return np.empty((0, lm.dim), dtype=np.float32)
        toks = torch.stack(tokens).to(lm.device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device_type="cuda", enabled=lm.device.startswith("cuda")):
            txt = lm.model.encode_text(toks, normalize=False)
        return txt.float().cpu().numpy().astype(np.float32, copy=False)
