"""The mapper stage: decode + preprocess (in DataLoader workers) and the model forward."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .images import ItemRejected, clean_caption, content_id, load_image


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
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (id, location) already in the store
    image_vectors: list[np.ndarray] = field(default_factory=list)   # precomputed sources
    text_vectors: list[np.ndarray] = field(default_factory=list)
    units_done: list[tuple[str, int, int]] = field(default_factory=list)  # (unit key, rows, rejects)
    read_seconds: float = 0.0
    decode_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.rows)


def prepare_item(item: Any, *, preprocess: Any, tokenizer: Any, done_ids: frozenset | set,
                 dim: int | None, out: Prepared) -> None:
    """Clean, id, skip-or-decode one source item into `out` (a reject is recorded, never raised)."""
    from .images import check_vector
    t0 = time.perf_counter()
    try:
        caption = clean_caption(item.caption_raw)
        sid = item.id or content_id(item.image_bytes or b"", caption,
                                    extra="" if item.image_bytes is not None else (item.uri or ""))
        if sid in done_ids:
            out.skipped.append((sid, item.location))
            return
        row = {"id": sid, "uri": item.uri, "caption": caption, "width": None, "height": None,
               "location": item.location, "caption_truncated": caption_truncated(tokenizer, caption)
               if tokenizer is not None else False, "meta": item.meta or {}}
        if item.image_bytes is None:   # precomputed embeddings
            if item.image_embedding is None or item.text_embedding is None:
                raise ItemRejected("missing_vector", "row has no image or text embedding")
            img = check_vector(item.image_embedding, dim)
            txt = check_vector(item.text_embedding, dim)
            out.image_vectors.append(img)
            out.text_vectors.append(txt)
        else:
            image = load_image(item.image_bytes)
            row["width"], row["height"] = image.size
            out.pixels.append(preprocess(image))
            out.tokens.append(tokenizer([caption])[0])
        out.rows.append(row)
    except ItemRejected as e:
        out.rejects.append((item.location, e.reason, e.detail))
    except Exception as e:  # noqa: BLE001 - one bad item never aborts the run
        out.rejects.append((item.location, "unexpected_error", f"{e.__class__.__name__}: {e}"[:500]))
    finally:
        out.decode_seconds += time.perf_counter() - t0


class Encoder:
    """Runs the open_clip towers (normalize=False: raw vectors are stored)."""

    def __init__(self, loaded: Any):
        self.loaded = loaded

    def __call__(self, pixels: list[Any], tokens: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        import torch
        lm = self.loaded
        images = torch.stack(pixels).to(lm.device, non_blocking=True)
        tokens = torch.stack(tokens).to(lm.device, non_blocking=True)
        use_amp = lm.device.startswith("cuda")
        with torch.no_grad(), torch.autocast(device_type="cuda", enabled=use_amp):
            img = lm.model.encode_image(images, normalize=False)
            txt = lm.model.encode_text(tokens, normalize=False)
        return (img.float().cpu().numpy().astype(np.float32, copy=False),
                txt.float().cpu().numpy().astype(np.float32, copy=False))

    def text(self, tokens: list[Any]) -> np.ndarray:
        """The text tower alone (`ingest --update` re-encodes changed captions)."""
        import torch
        lm = self.loaded
        if not tokens:
            return np.empty((0, lm.dim), dtype=np.float32)
        toks = torch.stack(tokens).to(lm.device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device_type="cuda", enabled=lm.device.startswith("cuda")):
            txt = lm.model.encode_text(toks, normalize=False)
        return txt.float().cpu().numpy().astype(np.float32, copy=False)
