"""ingest.images: decoding, caption cleaning, vector checks, content ids.

Every fixture is generated in memory; each bad input has its own test.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clipsql.ingest.images import ItemRejected, check_vector, clean_caption, content_id, load_image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noisy_rgb(w=64, h=64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but that holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def rejected(fn, *args, **kw) -> ItemRejected:
    with pytest.raises(ItemRejected) as info:
        fn(*args, **kw)
    return info.value


def close(pixel, expected, tol=6):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


# ------------------------------------------------------------------ good images


def test_rgb_png_roundtrip():
    img = load_image(encode(Image.new("RGB", (8, 8), (10, 20, 30))))
    assert img.mode == "RGB" and img.size == (8, 8)
    assert img.getpixel((3, 3)) == (10, 20, 30)


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # red
    img = load_image(data)
    assert img.mode == "RGB"
    assert close(img.getpixel((4, 4)), (255, 0, 0), tol=40)


def test_palette_png_with_transparency_composited_on_white():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    for x in range(4):
        for y in range(8):
            p.putpixel((x, y), 1)
    img = load_image(encode(p, transparency=0))
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (255, 0, 0)
    assert img.getpixel((6, 1)) == (255, 255, 255)  # transparent black -> white, not black


def test_la_composited_on_white():
    la = Image.new("LA", (8, 8), (0, 0))  # fully transparent black
    la.paste((0, 255), (0, 0, 4, 8))  # left half opaque black
    img = load_image(encode(la))
    assert img.getpixel((1, 1)) == (0, 0, 0)
    assert img.getpixel((6, 1)) == (255, 255, 255)


def test_rgba_composited_on_white():
    img = load_image(encode(Image.new("RGBA", (8, 8), (255, 0, 0, 128))))
    assert img.mode == "RGB"
    assert close(img.getpixel((0, 0)), (255, 127, 127), tol=2)


def test_grayscale_l_becomes_rgb():
    img = load_image(encode(Image.new("L", (8, 8), 77)))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)


def test_16bit_grayscale_png_is_scaled_not_clipped():
    a = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)
    data = encode(Image.fromarray(a))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    img = load_image(data)
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_float_tiff_in_unit_range_is_scaled():
    a = np.array([[0.0, 0.5, 1.0, 0.25]] * 2, dtype=np.float32)
    img = load_image(encode(Image.fromarray(a), "TIFF"))
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 64]


def test_32bit_int_tiff_with_wide_range_is_stretched():
    a = np.array([[-100000, 0, 100000]] * 2, dtype=np.int32)
    img = load_image(encode(Image.fromarray(a), "TIFF"))
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    img = load_image(data)
    assert img.mode == "RGB" and close(img.getpixel((4, 4)), (255, 0, 0))


def test_exif_orientation_applied():
    stored = Image.new("RGB", (8, 4), (255, 0, 0))
    stored.paste((0, 0, 255), (4, 0, 8, 4))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    img = load_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert img.size == (4, 8)
    assert close(img.getpixel((2, 1)), (255, 0, 0), tol=40)
    assert close(img.getpixel((2, 6)), (0, 0, 255), tol=40)


# ------------------------------------------------------------------ bad images


def test_zero_byte_file():
    assert rejected(load_image, b"").reason == "empty_file"


def test_text_file_is_not_an_image():
    assert rejected(load_image, b"just some notes\nnot a picture\n").reason == "not_an_image"


def test_truncated_jpeg():
    data = encode(noisy_rgb(), "JPEG")
    assert rejected(load_image, data[: len(data) // 2]).reason == "corrupt_image"


def test_truncated_png():
    data = encode(noisy_rgb())
    assert rejected(load_image, data[: len(data) // 2]).reason == "corrupt_image"


def test_png_signature_followed_by_garbage_is_corrupt():
    assert rejected(load_image, b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10).reason == "corrupt_image"


def test_corrupt_png_data():
    data = bytearray(encode(noisy_rgb()))
    idat = data.index(b"IDAT")
    for i in range(idat + 20, idat + 60):
        data[i] ^= 0xFF  # damage the compressed pixels (and the chunk CRC no longer matches)
    assert rejected(load_image, bytes(data)).reason == "corrupt_image"


def test_decompression_bomb_header_checked_before_decoding():
    # The file holds no pixel data at all: decoding it would say corrupt_image.
    e = rejected(load_image, png_header_only(5_000, 5_000), max_pixels=1_000_000)
    assert e.reason == "decompression_bomb"
    assert "5000x5000" in e.detail


def test_decompression_bomb_pillow_warning():
    assert rejected(load_image, png_header_only(10_000, 10_000)).reason == "decompression_bomb"


def test_decompression_bomb_pillow_error():
    assert rejected(load_image, png_header_only(100_000, 100_000)).reason == "decompression_bomb"


def test_max_pixels_option():
    data = encode(Image.new("RGB", (8, 8)))
    assert rejected(load_image, data, max_pixels=63).reason == "decompression_bomb"
    assert load_image(data, max_pixels=64).size == (8, 8)


# ------------------------------------------------------------------ captions


def test_caption_none():
    assert rejected(clean_caption, None).reason == "missing_caption"


@pytest.mark.parametrize("raw", ["", "   ", " \t\n\r ", b"", b"\x00\x01", "\ufeff"])
def test_caption_empty_or_whitespace(raw):
    assert rejected(clean_caption, raw).reason == "empty_caption"


def test_caption_not_utf8_reports_offset():
    e = rejected(clean_caption, b"caf\xe9 au lait")
    assert e.reason == "caption_not_utf8" and "offset 3" in e.detail


def test_caption_not_utf8_offset_counts_the_bom():
    e = rejected(clean_caption, b"\xef\xbb\xbfab\xff")
    assert e.reason == "caption_not_utf8" and "offset 5" in e.detail


def test_caption_lone_surrogate_str():
    assert rejected(clean_caption, "bad \udcff").reason == "caption_not_utf8"


def test_caption_bom_removed():
    assert clean_caption(b"\xef\xbb\xbfa red car") == "a red car"
    assert clean_caption("\ufeffa red car") == "a red car"


def test_caption_control_characters_and_whitespace():
    assert clean_caption("  a\x00b\x07c\td\n\n e\x7f  ") == "abc d e"
    assert clean_caption(b"line one\r\nline  two") == "line one line two"


def test_caption_context_note_in_detail():
    assert "img/cat.txt" in rejected(clean_caption, None, "img/cat.txt").detail


def test_caption_valid_utf8_bytes():
    assert clean_caption("  Übergrößenträger 🚲 ".encode()) == "Übergrößenträger 🚲"


# ------------------------------------------------------------------ vectors


def test_vector_ok_returns_float32_copy():
    src = np.arange(1, 5, dtype=np.float64)
    out = check_vector(src, 4)
    assert out.dtype == np.float32 and out.shape == (4,)
    out[0] = 99
    assert src[0] == 1
    assert check_vector([1, 2, 3], 3).tolist() == [1.0, 2.0, 3.0]


def test_vector_nan():
    assert rejected(check_vector, [1.0, float("nan"), 0.0], 3).reason == "non_finite_vector"


def test_vector_inf():
    assert rejected(check_vector, np.array([1.0, np.inf, 0.0]), 3).reason == "non_finite_vector"


def test_vector_float64_overflowing_float32():
    assert rejected(check_vector, np.array([1e300, 1.0]), 2).reason == "non_finite_vector"


def test_vector_zero():
    assert rejected(check_vector, np.zeros(3, np.float16), 3).reason == "zero_vector"


def test_vector_wrong_dim():
    e = rejected(check_vector, np.ones(3), 4)
    assert e.reason == "wrong_dim" and e.detail == "expected 4, got 3"


def test_vector_two_dimensional():
    assert rejected(check_vector, np.ones((2, 3)), 3).reason == "bad_vector"


def test_vector_not_numeric():
    assert rejected(check_vector, ["a", "b"], 2).reason == "bad_vector"
    assert rejected(check_vector, None, 2).reason == "bad_vector"
    assert rejected(check_vector, b"\x00\x00\x80?", 1).reason == "bad_vector"


# ------------------------------------------------------------------ content ids


def test_content_id_stable():
    a = content_id(b"\x89PNGdata", "a cat")
    assert a == content_id(b"\x89PNGdata", "a cat")
    assert len(a) == 32 and int(a, 16) >= 0


def test_content_id_differs():
    base = content_id(b"img", "a cat")
    assert content_id(b"img", "a dog") != base
    assert content_id(b"img2", "a cat") != base
    assert content_id(b"img", "a cat", extra="x") != base
    assert content_id(b"ab", "c") != content_id(b"a", "bc")  # parts are length-prefixed


def test_content_id_precomputed_rows_hash_uri():
    assert content_id(None, "cap", extra="http://x/1.jpg") == content_id(b"", "cap", extra="http://x/1.jpg")
    assert content_id(b"", "cap", extra="http://x/1.jpg") != content_id(b"", "cap", extra="http://x/2.jpg")
