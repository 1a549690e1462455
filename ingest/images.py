"""Decoding and validation of single ingest items.

Everything here works on *one* item and signals a bad item by raising
:class:`ItemRejected`.  The pipeline records such an item as a reject (with
``reason`` as a short code) and carries on: one bad image never aborts a run.
Errors about a whole source live in :mod:`store.errors` instead.

Reject reason codes raised here:

``empty_file``           the image bytes are empty
``not_an_image``         the bytes are not in any image format Pillow knows
``corrupt_image``        an image format was recognised but the data is
                         truncated or damaged (the image is fully decoded to
                         find out; truncated images are never accepted)
``decompression_bomb``   the header claims more pixels than ``max_pixels``
                         (checked *before* any pixel is decoded) or Pillow
                         raised its own decompression-bomb warning/error
``extreme_aspect_ratio`` longer side over ``MAX_ASPECT`` (100) times the shorter: the
                         model's resize would blow it up to gigabytes
``unsupported_image_mode`` a pixel mode that cannot be turned into RGB
``missing_caption``      no caption at all (``None``)
``caption_not_utf8``     caption bytes that are not valid UTF-8
``empty_caption``        nothing left after cleaning
``bad_vector``           a precomputed embedding that is not a 1-D numeric vector
``wrong_dim``            a vector of the wrong length
``non_finite_vector``    a vector holding NaN or infinity
``zero_vector``          a vector of zeros only (it cannot be normalised)
"""

from __future__ import annotations

import unicodedata

import hashlib
import io
import warnings

import numpy as np

from clipsql.lazy import PIL_Image as Image, PIL_ImageOps as ImageOps

__all__ = [
    "ItemRejected",
    "load_image",
    "to_rgb",
    "clean_caption",
    "check_vector",
    "content_id",
    "DEFAULT_MAX_PIXELS",
]

#: Same default as Pillow's ``Image.MAX_IMAGE_PIXELS`` (about 0.09 gigapixels).
DEFAULT_MAX_PIXELS = 89_478_485
#: Longest side / shortest side beyond which an image is rejected (``extreme_aspect_ratio``).
MAX_ASPECT = 100


class ItemRejected(Exception):
    """A single bad item; the pipeline records it as a reject and goes on.

    ``reason`` is a short snake_case code (see the module docstring),
    ``detail`` a human-readable explanation.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- images

# Leading bytes of the formats we expect.  When Pillow cannot identify bytes
# that *start* like one of these, the file is a damaged image ("corrupt_image"),
# not some other kind of file ("not_an_image").
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little endian
    b"MM\x00*",  # TIFF, big endian
)


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_MAGIC):
        return True
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into a fully loaded 8-bit RGB image.

    * the header is read first and an image with more than ``max_pixels``
      pixels is rejected before any pixel data is decoded;
    * the (first frame of the) image is then fully decoded, so truncated or
      damaged files are rejected here rather than later (Pillow's
      ``LOAD_TRUNCATED_IMAGES`` is deliberately left off);
    * the EXIF orientation is applied (a damaged EXIF block is ignored: the
      pixels are fine, only the rotation is unknown);
    * every mode is converted to RGB: transparency is composited onto white,
      16/32-bit and float images are *scaled* (not clipped) to 8 bits, CMYK,
      palette, grey and other modes go through Pillow's conversions;
    * animated GIF/WebP/APNG: the first frame.

    Raises :class:`ItemRejected` (see the module docstring for the codes).
    Pillow's decompression-bomb warning is turned into an error for the
    duration of the call (``warnings.catch_warnings`` is process-global, so
    call this from worker processes rather than from many threads at once).
    """
    if not data:
        raise ItemRejected("empty_file", "the file is 0 bytes long")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ItemRejected("decompression_bomb", str(e)) from None
        except Image.UnidentifiedImageError:
            if _looks_like_image(data):
                raise ItemRejected(
                    "corrupt_image", "damaged header: the format is recognised but unreadable"
                ) from None
            raise ItemRejected(
                "not_an_image", f"not a known image format (starts with {data[:8]!r})"
            ) from None
        except Exception as e:  # any other failure while parsing the header
            raise ItemRejected("corrupt_image", f"{type(e).__name__}: {e}") from None

        width, height = img.size
        if width * height > max_pixels:
            raise ItemRejected(
                "decompression_bomb",
                f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
            )
        if width == 0 or height == 0:
            raise ItemRejected("corrupt_image", f"image has no pixels ({width}x{height})")
        if max(width, height) > MAX_ASPECT * min(width, height):
            # preprocessing resizes the short side to the model's size: 1 x 300,000 would become
            # 224 x 67M pixels (GBs) before the centre crop
            raise ItemRejected("extreme_aspect_ratio", f"{width}x{height} is more than {MAX_ASPECT}:1; "
                                                       "the model's resize would blow it up to "
                                                       f"{max(width, height) // min(width, height)}x its crop")
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ItemRejected("decompression_bomb", str(e)) from None
        except Exception as e:  # OSError "truncated", SyntaxError, zlib errors, ...
            raise ItemRejected("corrupt_image", f"{type(e).__name__}: {e}") from None

    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # damaged EXIF: keep the pixels as stored
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (transparency composited on white; 16-bit, 32-bit and
    float images scaled, see `_scale_to_8bit`): what ingest encodes and what thumbnails show."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(img).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        try:
            rgba = img.convert("RGBA")
        except ValueError as e:
            raise ItemRejected("unsupported_image_mode", f"{mode}: {e}") from None
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ItemRejected("unsupported_image_mode", f"{mode}: {e}") from None


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float grey image to an 8-bit ``L`` image.

    * ``I;16*`` (and ``I`` whose values fit in 0..65535, which is how some
      decoders hand out 16-bit data): ``v / 257``, so 65535 -> 255, 257 -> 1;
    * float images whose values lie in [0, 1]: ``v * 255``;
    * anything else (negative or very large values): the actual value range is
      stretched linearly onto 0..255 (a constant image becomes mid grey).
    NaN and infinities in float images become 0.
    """
    a = np.asarray(img)
    if a.ndim != 2:  # no multi-channel high-depth modes exist in Pillow, be safe
        raise ItemRejected("unsupported_image_mode", f"{img.mode} with shape {a.shape}")
    a = a.astype(np.float64)
    a[~np.isfinite(a)] = 0.0
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I") and lo >= 0 and hi <= 65535:
        out = a / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1.0:
        out = a * 255.0
    elif hi > lo:
        out = (a - lo) * (255.0 / (hi - lo))
    else:
        out = np.full_like(a, 128.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))  # mode L


# --------------------------------------------------------------------------- captions

_BOM = "\ufeff"
# Control characters (Unicode category Cc) that are not whitespace are deleted;
# whitespace controls (\t, \n, \r, \x1c-\x1f, \x85, ...) become word separators.
_DELETE_CONTROLS = {
    c: None
    for c in [*range(0x00, 0x20), *range(0x7F, 0xA0), ord(_BOM)]
    if not chr(c).isspace()
}


def clean_caption(raw: bytes | str | None, context_note: str | None = None) -> str:
    """Return a cleaned caption, or raise :class:`ItemRejected`.

    ``raw`` is the caption as the source holds it: ``bytes`` (decoded as
    strict UTF-8), ``str``, or ``None``.  Cleaning removes a UTF-8 byte-order
    mark (U+FEFF), deletes NUL and other control characters, and collapses every
    run of whitespace into one space, stripping both ends.

    ``context_note`` (e.g. ``"img/cat.txt"``) is appended to the detail of a
    rejection so the reject log says where the caption came from.
    """
    where = f" ({context_note})" if context_note else ""
    if raw is None:
        raise ItemRejected("missing_caption", f"no caption{where}")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        skip = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        try:
            text = raw[skip:].decode("utf-8")
        except UnicodeDecodeError as e:
            offset = e.start + skip
            raise ItemRejected(
                "caption_not_utf8",
                f"invalid UTF-8 at byte offset {offset} "
                f"({raw[offset:offset + 4]!r}){where}; re-encode the caption as UTF-8",
            ) from None
    elif isinstance(raw, str):
        text = raw
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from surrogateescape
            raise ItemRejected(
                "caption_not_utf8",
                f"character {e.start} cannot be encoded as UTF-8{where}",
            ) from None
    else:
        raise TypeError(f"caption must be bytes, str or None, not {type(raw).__name__}")
    text = " ".join(text.translate(_DELETE_CONTROLS).split())
    if not text:
        raise ItemRejected("empty_caption", f"caption is empty after cleaning{where}")
    if all(c == " " or unicodedata.category(c) == "Cf" for c in text):   # stops at the first visible one
        raise ItemRejected("empty_caption", f"caption has only invisible characters (zero-width spaces, "
                                            f"joiners, marks){where}")
    return text


# --------------------------------------------------------------------------- vectors


def check_vector(v, dim: int) -> np.ndarray:
    """Validate a precomputed embedding and return it as a new float32 ``(dim,)`` array.

    Rejects (in this order): anything that is not a 1-D array of real numbers
    (``bad_vector``), a length other than ``dim`` (``wrong_dim``), NaN or
    infinity, including float64 values too large for float32
    (``non_finite_vector``), and the all-zero vector (``zero_vector``).
    """
    if v is None:
        raise ItemRejected("bad_vector", "no vector")
    try:
        a = np.asarray(v)
        if a.dtype == object:
            a = a.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise ItemRejected("bad_vector", f"not a numeric vector: {e}") from None
    if a.dtype.kind not in "iuf":
        raise ItemRejected("bad_vector", f"expected real numbers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ItemRejected("bad_vector", f"expected a 1-D vector, got shape {a.shape}")
    if a.shape[0] != dim:
        raise ItemRejected("wrong_dim", f"expected {dim}, got {a.shape[0]}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.array(a, dtype=np.float32)  # always a copy (detached from any mmap)
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ItemRejected("non_finite_vector", f"value {out[bad]} at index {bad}")
    if not out.any():
        raise ItemRejected("zero_vector", "all components are zero")
    return out


# --------------------------------------------------------------------------- ids


def content_id(image_bytes: bytes | None, caption: str, extra: str = "") -> str:
    """A stable sample id: the first 32 hex digits of a SHA-256.

    The hash covers the image bytes, the UTF-8 caption and ``extra``, each
    prefixed by its length (so no two different triples can collide by
    shifting bytes from one part to the next).  The same image and caption
    always give the same id, across runs and machines.

    Precomputed rows have no image bytes: pass ``b""`` (or ``None``) as
    ``image_bytes`` and the row's uri as ``extra``, so the id covers
    uri + caption.
    """
    h = hashlib.sha256()
    for part in (image_bytes or b"", caption.encode("utf-8"), extra.encode("utf-8")):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]
