"""Prompt encoding for SQL (docs/science.md §7): `text_embedding('a prompt' [, model])`.

A store records how each model was loaded (`ModelRecord.spec`); `load_for_record`
rebuilds the open_clip model from it through `models.loading` (resolve, then load)
and checks that it is still the same model (same id, same dimension). The text
tower of a model is loaded lazily, once per connection, the first time a prompt
needs it; each distinct prompt is encoded once per connection and cached, so a
query that scores a million rows against one prompt runs the tower once.

Embeddings are RAW (`normalize=False`), like the stored text embeddings, so a
prompt embedding can be compared with stored ones under every score.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from clipsql.errors import ModelError, QueryError
from clipsql.lazy import torch
from clipsql.models import loading as models


def load_for_record(rec: Any, device: str = "auto") -> Any:
    """The open_clip model a store's model record (a store.records.ModelRecord) names (a LoadedModel).

    ModelError naming the model when its weights cannot be loaded here (precomputed
    embeddings of a hub model on an offline machine, a moved local folder, …).
    """
    spec = rec.spec or {}
    name = spec.get("given") or spec.get("open_clip_name")
    pretrained, checkpoint = spec.get("pretrained"), None
    if spec.get("local") and pretrained:          # ARCH --checkpoint FILE
        pretrained, checkpoint = None, pretrained
    how = ("its weights must be loadable here: a bundled model, a local-dir: folder, a checkpoint file, "
           "or hub weights already in the local cache")
    if not name:
        raise ModelError(f"model {rec.model_id} was recorded without a loadable spec; {how}")
    try:
        resolved = models.resolve(name, pretrained, checkpoint)
        if resolved.model_id != rec.model_id:
            raise ModelError(f"{name} now resolves to {resolved.model_id}, not {rec.model_id} "
                             "(the weights changed since ingest)")
    except ModelError as e:
        raise ModelError(f"cannot load the text tower of model {rec.model_id}: {e}. {how[0].upper()}{how[1:]}") \
            from None
    try:
        loaded = models.load(resolved, device, how=QUERY_HOW)
    except ModelError as e:
        raise ModelError(f"cannot load the text tower of model {rec.model_id} (prompts need it): {e}") from None
    if loaded.dim != rec.dim:
        raise ModelError(f"model {rec.model_id} now produces {loaded.dim}-d embeddings, the store holds "
                         f"{rec.dim}-d ones")
    return loaded


QUERY_HOW = ("copy the weights into this machine's Hugging Face cache (~/.cache/huggingface/hub, e.g. "
             "`huggingface-cli download REPO` on a connected machine), or embed the prompt elsewhere and "
             "pass the vector itself instead of the prompt text")


class PromptCache:
    """Per-connection cache: loaded models (by model id) and raw prompt embeddings (by model id, prompt)."""

    def __init__(self, device: str = "auto"):
        self.device = device
        self._models: dict[str, Any] = {}
        self._vectors: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()     # DuckDB may call UDFs from several threads
        self.encoded = 0                  # prompts that went through a text tower (for tests/benchmarks)

    def model(self, rec: Any) -> Any:
        if rec.model_id not in self._models:
            self._models[rec.model_id] = load_for_record(rec, self.device)
        return self._models[rec.model_id]

    def embed(self, rec: Any, prompts: list[str]) -> np.ndarray:
        """(len(prompts), d) float32 raw text embeddings. Each new distinct prompt is encoded alone (a batch
        of one), so its vector never depends on which other prompts a query happens to hold."""
        if any(not p.strip() for p in prompts):
            raise QueryError("the prompt is empty: give text to embed, e.g. importance_weight(image_embedding, "
                             "'a photo of a dog')")
        with self._lock:
            todo = sorted({p for p in prompts if (rec.model_id, p) not in self._vectors})
            if todo:
                V = encode_texts(self.model(rec), todo, batch_size=1)
                for p, v in zip(todo, V):
                    v.setflags(write=False)
                    self._vectors[(rec.model_id, p)] = v
                self.encoded += len(todo)
            if not prompts:
                return np.empty((0, rec.dim), dtype=np.float32)
            return np.stack([self._vectors[(rec.model_id, p)] for p in prompts])


def encode_texts(loaded: Any, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Raw (normalize=False) text embeddings, float32, through the model's text tower."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = loaded.tokenizer(texts[i:i + batch_size]).to(loaded.device)
        with torch.no_grad():
            out.append(loaded.model.encode_text(tokens, normalize=False).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def encode_images(loaded: Any, images: list[Any], batch_size: int = 64) -> np.ndarray:
    """Raw (normalize=False) image embeddings, float32, of PIL images through the image tower."""
    out = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([loaded.preprocess(im) for im in images[i:i + batch_size]]).to(loaded.device)
        with torch.no_grad():
            out.append(loaded.model.encode_image(pixels, normalize=False).float().cpu().numpy())
    if not out:
        return np.empty((0, loaded.dim), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
