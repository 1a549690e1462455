"""Procedurally generated demo data: coloured shapes with captions.

Every sample is a 64x64 RGB image of 1-3 simple shapes (circle, square,
triangle, star, cross) in one of 8 named colours, two sizes (small/large) and
five positions (left/right/top/bottom/center; a single shape is centred 20% of
the time, several shapes go to distinct sides) on a plain, slightly tinted grey
background, plus a caption built from the attributes with one of several
templates.  Size and position are optional in the caption and dropped at
random (kept with p=0.5 / 0.6); colour and shape are always mentioned.
``n_attributes`` counts the attribute mentions (shape, colour, size, position
phrase) of all objects in the caption; ``scene`` records what is drawn, and
``caption_matches(caption, scene)`` tells whether a caption is a correct
description of it (used for retrieval evaluation).

About 15% of the items are *degenerate* on purpose, so that dataset-curation
scores have something to find:

``blank``            (~5%) a flat single-colour image, paired with a normal
                      descriptive caption of some random scene;
``placeholder``      (~5%) an "image not found" icon (grey frame with a broken
                      image glyph, a big "?" or a big X; 8 near-identical
                      variants), paired with a normal random caption;
``generic_caption``  (~5%) a normal image whose caption is a generic
                      placeholder ("image", "IMG_1234.jpg", "<PERSON>", ...).

Everything is seeded and bit-for-bit deterministic (numpy ``PCG64`` + PIL
drawing primitives only, no fonts, no anti-aliasing).  Only numpy and PIL are
imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsql.lazy import PIL_Image as Image, PIL_ImageDraw as ImageDraw

GENERATOR_VERSION = "1"

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (135, 50, 185),
    "orange": (245, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# radius (half-extent) in pixels
SIZES: dict[str, tuple[int, int]] = {"small": (7, 9), "large": (12, 14)}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)

# anchor point (x, y) and the phrase used in captions
POSITIONS: dict[str, tuple[tuple[int, int], str]] = {  # order matters: center last
    "left": ((15, 32), "on the left"),
    "right": ((49, 32), "on the right"),
    "top": ((32, 15), "at the top"),
    "bottom": ((32, 49), "at the bottom"),
    "center": ((32, 32), "in the center"),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)

KINDS: tuple[str, ...] = ("normal", "blank", "placeholder", "generic_caption")
# probability of each degenerate kind (the rest is "normal")
DEGENERATE_RATE = 0.05

# generic captions; "{d4}" is replaced by 4 random digits
GENERIC_CAPTIONS: tuple[str, ...] = (
    "image",
    "a picture",
    "<PERSON>",
    "thumbnail",
    "IMG_{d4}.jpg",
    "untitled",
    "photo",
)

N_SHAPES_P = (0.5, 0.35, 0.15)  # P(1), P(2), P(3) shapes
P_SIZE_IN_CAPTION = 0.5
P_POSITION_IN_CAPTION = 0.6

_NUMBER_WORDS = {2: "two", 3: "three"}
_SINGLE_TEMPLATES = (
    "{o}",
    "a photo of {o}",
    "an image of {o}",
    "a picture of {o}",
    "{o} on a plain background",
)
_MULTI_TEMPLATES = (
    "{o}",
    "{n} shapes: {o}",
    "a photo of {o}",
    "an image of {n} shapes: {o}",
)


@dataclass
class DemoSample:
    image: np.ndarray  # (64, 64, 3) uint8
    caption: str
    kind: str  # one of KINDS
    n_attributes: int  # attribute words (shape, colour, size, position) in the caption
    n_shapes: int  # shapes actually drawn in the image (0 for blank / placeholder)
    # what is drawn: one (shape, colour, size, position) tuple per shape; () for blank / placeholder
    scene: tuple[tuple[str, str, str, str], ...] = ()


@dataclass
class _Shape:
    shape: str
    color: str
    size: str
    position: str


def is_generic_caption(caption: str) -> bool:
    """True when ``caption`` is one of GENERIC_CAPTIONS (digits filled in)."""
    return _GENERIC_RE.fullmatch(caption) is not None


_GENERIC_RE = re.compile(
    "|".join(re.escape(g).replace(re.escape("{d4}"), "[0-9]{4}") for g in GENERIC_CAPTIONS)
)


# --------------------------------------------------------------------------- scenes


def _random_scene(rng: np.random.Generator) -> list[_Shape]:
    n = int(rng.choice(3, p=N_SHAPES_P)) + 1
    # several shapes go to distinct sides (not the center) so they barely overlap
    positions = [4] if n == 1 and rng.random() < 0.2 else rng.permutation(4)[:n]
    return [
        _Shape(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            color=COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))],
            size=SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))],
            position=POSITION_NAMES[int(p)],
        )
        for p in positions
    ]


def _caption(scene: list[_Shape], rng: np.random.Generator) -> tuple[str, int]:
    """Caption for ``scene`` and the number of attribute words it mentions."""
    phrases = []
    n_attr = 0
    order = rng.permutation(len(scene)) if len(scene) > 1 else [0]
    for i in order:
        s = scene[int(i)]
        words = []
        if rng.random() < P_SIZE_IN_CAPTION:
            words.append(s.size)
        words += [s.color, s.shape]
        n_attr += len(words)
        phrase = " ".join(words)
        phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
        if rng.random() < P_POSITION_IN_CAPTION:
            phrase += " " + POSITIONS[s.position][1]
            n_attr += 1
        phrases.append(phrase)
    if len(phrases) == 1:
        objs = phrases[0]
        template = _SINGLE_TEMPLATES[int(rng.integers(len(_SINGLE_TEMPLATES)))]
        return template.format(o=objs), n_attr
    if len(phrases) == 2:
        objs = f"{phrases[0]} and {phrases[1]}"
    else:
        conj = ", and " if rng.random() < 0.5 else " and "
        objs = f"{phrases[0]}, {phrases[1]}{conj}{phrases[2]}"
    template = _MULTI_TEMPLATES[int(rng.integers(len(_MULTI_TEMPLATES)))]
    return template.format(o=objs, n=_NUMBER_WORDS[len(phrases)]), n_attr


_PHRASE_RE = re.compile(
    r"\ban? (?:(?P<size>%s) )?(?P<color>%s) (?P<shape>%s)(?: (?P<pos>%s))?"
    % (
        "|".join(SIZE_NAMES),
        "|".join(COLOR_NAMES),
        "|".join(SHAPES),
        "|".join(re.escape(p) for _, p in POSITIONS.values()),
    )
)
_POSITION_BY_PHRASE = {phrase: name for name, (_, phrase) in POSITIONS.items()}


def parse_caption(caption: str) -> list[tuple[str, str, str | None, str | None]]:
    """The objects a (non-generic) demo caption mentions.

    One ``(shape, colour, size or None, position or None)`` tuple per object
    phrase, in caption order; ``[]`` for generic captions.
    """
    return [
        (m["shape"], m["color"], m["size"], _POSITION_BY_PHRASE[m["pos"]] if m["pos"] else None)
        for m in _PHRASE_RE.finditer(caption)
    ]


def caption_matches(caption: str, scene) -> bool:
    """True when ``caption`` is a correct description of ``scene``.

    ``scene`` is a sample's ``scene`` (what is drawn).  The caption must
    mention exactly as many objects as are drawn, and the mentioned objects can
    be assigned one-to-one to drawn shapes so that every attribute the caption
    states (shape, colour, and size / position where given) is true.
    """

    objs = parse_caption(caption)
    if len(objs) != len(scene) or not objs:
        return False
    for perm in permutations(scene):
        if all(
            o[0] == d[0] and o[1] == d[1] and o[2] in (None, d[2]) and o[3] in (None, d[3])
            for o, d in zip(objs, perm)
        ):
            return True
    return False


# --------------------------------------------------------------------------- drawing


def _jitter_color(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + d, 0, 255))


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        ang = -np.pi / 2 + k * np.pi / 5
        rr = r if k % 2 == 0 else r * 0.45
        pts.append((cx + rr * np.cos(ang), cy + rr * np.sin(ang)))
    return pts


def _cross_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    t = r * 0.38
    return [
        (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
        (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
        (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, s: _Shape, rng: np.random.Generator) -> None:
    (ax, ay), _ = POSITIONS[s.position]
    lo, hi = SIZES[s.size]
    r = int(rng.integers(lo, hi + 1))
    cx = ax + int(rng.integers(-2, 3))
    cy = ay + int(rng.integers(-2, 3))
    fill = _jitter_color(COLORS[s.color], rng, 12)
    if s.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.shape == "square":
        q = round(r * 0.85)
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif s.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif s.shape == "star":
        draw.polygon(_star_points(cx, cy, r + 1), fill=fill)
    elif s.shape == "cross":
        draw.polygon(_cross_points(cx, cy, r), fill=fill)
    else:  # pragma: no cover
        raise ValueError(s.shape)


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    g = int(rng.integers(70, 191))
    return _jitter_color((g, g, g), rng, 8)


def _render_scene(scene: list[_Shape], rng: np.random.Generator) -> np.ndarray:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _background(rng))
    draw = ImageDraw.Draw(img)
    for s in scene:
        _draw_shape(draw, s, rng)
    return np.asarray(img, dtype=np.uint8).copy()


def _render_blank(rng: np.random.Generator) -> np.ndarray:
    u = rng.random()
    if u < 0.25:
        c = (255, 255, 255)
    elif u < 0.4:
        c = (0, 0, 0)
    elif u < 0.7:
        c = _background(rng)
    else:
        c = tuple(int(v) for v in rng.integers(0, 256, size=3))
    return np.broadcast_to(np.asarray(c, dtype=np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()


def _render_placeholder(variant: int) -> np.ndarray:
    """One of 8 near-identical "image not found" icons (4 glyphs x 2 greys)."""
    glyph, shade = divmod(variant, 2)
    bg = (236, 236, 236) if shade == 0 else (224, 224, 226)
    fg = (150, 150, 150)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(img)
    d.rectangle([4, 4, 59, 59], outline=fg, width=3)
    if glyph == 0:  # broken image: mountains + sun with a zig-zag tear
        d.rectangle([14, 16, 49, 47], outline=fg, width=2)
        d.polygon([(16, 45), (26, 30), (33, 39), (39, 33), (47, 45)], fill=fg)
        d.ellipse([38, 19, 44, 25], fill=fg)
        d.line([(30, 14), (34, 22), (28, 28), (35, 36), (29, 42), (33, 49)], fill=bg, width=3)
    elif glyph == 1:  # big question mark (arc + stem + dot)
        d.arc([20, 12, 44, 34], start=180, end=90, fill=fg, width=5)
        d.line([(32, 33), (32, 41)], fill=fg, width=5)
        d.rectangle([29, 45, 35, 51], fill=fg)
    elif glyph == 2:  # big X
        d.line([(16, 16), (47, 47)], fill=fg, width=6)
        d.line([(16, 47), (47, 16)], fill=fg, width=6)
    else:  # broken image glyph without frame tear: a dog-eared page with an X
        d.polygon([(18, 12), (38, 12), (46, 20), (46, 52), (18, 52)], outline=fg, width=2)
        d.line([(38, 12), (38, 20), (46, 20)], fill=fg, width=2)
        d.line([(25, 28), (39, 42)], fill=fg, width=4)
        d.line([(25, 42), (39, 28)], fill=fg, width=4)
    return np.asarray(img, dtype=np.uint8).copy()


def _generic_caption(rng: np.random.Generator) -> str:
    g = GENERIC_CAPTIONS[int(rng.integers(len(GENERIC_CAPTIONS)))]
    if "{d4}" in g:
        g = g.replace("{d4}", "".join(str(int(x)) for x in rng.integers(0, 10, size=4)))
    return g


# --------------------------------------------------------------------------- API


def _one_sample(rng: np.random.Generator) -> DemoSample:
    u = rng.random()
    if u < DEGENERATE_RATE:
        kind = "blank"
    elif u < 2 * DEGENERATE_RATE:
        kind = "placeholder"
    elif u < 3 * DEGENERATE_RATE:
        kind = "generic_caption"
    else:
        kind = "normal"

    scene = _random_scene(rng)
    caption, n_attr = _caption(scene, rng)
    if kind == "blank":
        return DemoSample(_render_blank(rng), caption, kind, n_attr, 0)
    if kind == "placeholder":
        return DemoSample(_render_placeholder(int(rng.integers(8))), caption, kind, n_attr, 0)
    image = _render_scene(scene, rng)
    drawn = tuple((t.shape, t.color, t.size, t.position) for t in scene)
    if kind == "generic_caption":
        return DemoSample(image, _generic_caption(rng), kind, 0, len(scene), drawn)
    return DemoSample(image, caption, kind, n_attr, len(scene), drawn)


def generate_samples(n: int, seed: int = 0) -> list[DemoSample]:
    """``n`` demo samples; the same ``(n, seed)`` always gives identical samples.

    Samples are a prefix-stable stream: ``generate_samples(n, s)[:k] ==
    generate_samples(k, s)``.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x5EED])))
    return [_one_sample(rng) for _ in range(int(n))]


def write_dataset(out_dir, n: int = 2000, seed: int = 0) -> Path:
    """Write ``n`` samples as PNGs plus ``demo.parquet``; returns the parquet path.

    Layout: ``out_dir/images/000000.png ...`` and ``out_dir/demo.parquet`` with
    columns ``image`` (relative path), ``caption``, ``kind``, ``n_attributes``,
    ``n_shapes``.  Same seed -> byte-identical PNG files.
    """

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = generate_samples(n, seed)
    rel = []
    for i, s in enumerate(samples):
        name = f"images/{i:06d}.png"
        Image.fromarray(s.image, mode="RGB").save(out / name, format="PNG", compress_level=6)
        rel.append(name)
    table = pa.table(
        {
            "image": pa.array(rel, pa.string()),
            "caption": pa.array([s.caption for s in samples], pa.string()),
            "kind": pa.array([s.kind for s in samples], pa.string()),
            "n_attributes": pa.array([s.n_attributes for s in samples], pa.int32()),
            "n_shapes": pa.array([s.n_shapes for s in samples], pa.int32()),
        }
    )
    path = out / "demo.parquet"
    pq.write_table(table, path)
    return path
