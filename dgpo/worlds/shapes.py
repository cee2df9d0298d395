"""The shapes world (spec v1; ``docs/shapes.md``): a procedural, GenEval-like compositional world.

Images are S×S RGB uint8 canvases (default S = 32) with a black background and a few flat-coloured
objects (square / circle / triangle, in red / green / blue / yellow). The module provides

* the prompt grammar (126 prompts in six categories) and a fixed train/test split: :func:`prompts`,
  :func:`parse`, :func:`category`;
* a renderer that draws a random scene satisfying a prompt: :func:`render` (and :func:`render_parsed` for
  any meaning, e.g. a caption of the wider pretraining grammar in :mod:`dgpo.worlds.shapes_captions`);
* the rule-based verifier (the reward): :func:`detect`, :func:`score`, :func:`partial_score` and their
  batch versions (and :func:`score_parsed`, :func:`partial_score_parsed` for any meaning);
* the task metric ("shapes-geneval"): :func:`geneval`.

Everything is deterministic: the split depends only on the prompt strings, a render only on
``(prompt, size, seed)``, and the verifier only on the pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from dgpo.errors import shown

__all__ = [
    "COLORS",
    "SHAPES",
    "CATEGORIES",
    "RELATIONS",
    "NUMBERS",
    "SPLITS",
    "ParsedPrompt",
    "Obj",
    "prompts",
    "parse",
    "category",
    "size_range",
    "render",
    "render_parsed",
    "detect",
    "score",
    "partial_score",
    "score_parsed",
    "partial_score_parsed",
    "score_batch",
    "partial_score_batch",
    "soft_partial_score",
    "soft_partial_score_batch",
    "shape_credit",
    "geneval",
]

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 230),
    "yellow": (230, 210, 50),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
SPLITS: tuple[str, ...] = ("train", "test", "all")

#: Verifier constants (spec, "The verifier").
BACKGROUND_DISTANCE = 120.0  # a pixel farther than this from its nearest palette colour is background
MIN_AREA_FRACTION = 0.02  # objects have area >= 0.02 * S^2
ASPECT_RANGE = (0.67, 1.5)  # bbox w/h outside this range -> "other"
FILL_SQUARE, FILL_CIRCLE, FILL_TRIANGLE = 0.88, 0.66, 0.35
RELATION_MARGIN = 0.1  # "A left of B" <=> cx_A + 0.1 * S < cx_B

#: Renderer constants.
MARGIN = 1  # px between every box and the canvas border
GAP = 2  # px between the boxes of two objects
TEST_FRACTION = 0.25  # per category, ceil(0.25 * n) prompts go to the test split
_SPLIT_SALT = "shapes-world-split-v1"
_RENDER_SALT = "shapes-world-render-v1"

_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
#: Label 0 is black (background); labels 1..4 are the palette colours in ``COLORS`` order.
_PALETTE = np.array([(0, 0, 0)] + [COLORS[c] for c in _COLOR_NAMES], dtype=np.int32)


# --------------------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt's meaning.

    The benchmark prompts use a subset of what this type can say: their counting and position prompts
    leave every colour free, and their color_attr prompts name two different colours. The wider caption
    grammar of :mod:`dgpo.worlds.shapes_captions` uses the rest (a colour on any object, equal colours),
    and the renderer and verifier handle every combination.

    Attributes:
        category: one of :data:`CATEGORIES`: the verifier rule that applies (a coloured two-object caption
            is "color_attr" whichever colours it names, one or both, equal or not).
        shapes: the shapes named, in prompt order (one for single_object / counting / colors, two otherwise).
        colors: one entry per shape: the required colour name, or ``None`` where the colour is free
            (for counting, the colour of all N objects).
        count: objects required of each listed shape (N for counting, 1 otherwise).
        relation: for position prompts the relation of ``shapes[0]`` to ``shapes[1]``
            ("left of", "right of", "above", "below"); ``None`` otherwise.
    """

    category: str
    shapes: tuple[str, ...]
    colors: tuple[str | None, ...]
    count: int = 1
    relation: str | None = None


def _plural(shape: str) -> str:
    return shape + "s"


def _grammar() -> dict[str, ParsedPrompt]:
    """Every prompt of the grammar, in canonical order (category, then template order)."""
    table: dict[str, ParsedPrompt] = {}
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    color_pairs = [(a, b) for a in _COLOR_NAMES for b in _COLOR_NAMES if a != b]
    for s in SHAPES:
        table[f"a photo of a {s}"] = ParsedPrompt("single_object", (s,), (None,))
    for a, b in pairs:
        table[f"a photo of a {a} and a {b}"] = ParsedPrompt("two_object", (a, b), (None, None))
    for word, n in NUMBERS.items():
        for s in SHAPES:
            table[f"a photo of {word} {_plural(s)}"] = ParsedPrompt("counting", (s,), (None,), count=n)
    for c in _COLOR_NAMES:
        for s in SHAPES:
            table[f"a photo of a {c} {s}"] = ParsedPrompt("colors", (s,), (c,))
    for a, b in pairs:
        for rel in RELATIONS:
            table[f"a photo of a {a} {rel} a {b}"] = ParsedPrompt(
                "position", (a, b), (None, None), relation=rel
            )
    for a, b in pairs:
        for ca, cb in color_pairs:
            table[f"a photo of a {ca} {a} and a {cb} {b}"] = ParsedPrompt("color_attr", (a, b), (ca, cb))
    return table


_GRAMMAR: dict[str, ParsedPrompt] = _grammar()


def _split_key(prompt: str) -> str:
    """The seeded shuffle key of a prompt (a salted SHA-256, independent of any RNG implementation)."""
    return hashlib.sha256(f"{_SPLIT_SALT}|{prompt}".encode()).hexdigest()


def _make_split() -> dict[str, frozenset[str]]:
    """Per category: order the prompts by their salted hash and send the first ceil(0.25·n) to test."""
    test: set[str] = set()
    for cat in CATEGORIES:
        members = sorted((p for p, q in _GRAMMAR.items() if q.category == cat), key=_split_key)
        n_test = min(len(members) - 1, max(1, math.ceil(TEST_FRACTION * len(members))))
        test.update(members[:n_test])
    return {"test": frozenset(test), "train": frozenset(set(_GRAMMAR) - test)}


_SPLIT = _make_split()


def prompts(split: str = "all") -> list[str]:
    """The prompts of a split ("train", "test" or "all"), in canonical (category, template) order.

    The split is fixed: within each category the prompts are ordered by a salted SHA-256 of their text and
    the first ceil(0.25·n) go to test (33 test, 93 train prompts); both splits hold every category.
    """
    if split == "all":
        return list(_GRAMMAR)
    if split not in _SPLIT:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    members = _SPLIT[split]
    return [p for p in _GRAMMAR if p in members]


def parse(prompt: str) -> ParsedPrompt:
    """Parse a prompt of the grammar.

    Surrounding whitespace is ignored; otherwise the prompt must match a template exactly (lower case,
    single spaces). Anything else raises ``ValueError`` quoting the prompt.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    parsed = _GRAMMAR.get(prompt.strip())
    if parsed is None:
        raise ValueError(
            f"prompt {shown(prompt)!r} is not in the shapes grammar; expected one of the 126 prompts of "
            "dgpo.worlds.shapes.prompts('all'), e.g. 'a photo of a red circle and a blue square'"
        )
    return parsed


def category(prompt: str) -> str:
    """The category of a prompt (one of :data:`CATEGORIES`)."""
    return parse(prompt).category


# --------------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------------


def size_range(size: int) -> tuple[int, int]:
    """Object side range [round(0.28·S), round(0.38·S)] (rounded half-up, in integer arithmetic)."""
    return (28 * size + 50) // 100, (38 * size + 50) // 100


@lru_cache(maxsize=None)
def _shape_mask(shape: str, s: int) -> np.ndarray:
    """The boolean s×s mask of a shape drawn in its box, decided on pixel centres.

    With local pixel-centre coordinates u = i + 0.5 − s/2 (columns) and v = j + 0.5 (rows, from the top):
    square: every pixel; circle: u² + (v − s/2)² ≤ (s/2)²; triangle (apex (s/2, 0), base on the bottom
    edge): |u| ≤ v/2.
    """
    centers = np.arange(s) + 0.5
    u = centers[None, :] - s / 2.0
    v = centers[:, None]
    if shape == "square":
        mask = np.ones((s, s), dtype=bool)
    elif shape == "circle":
        mask = u**2 + (v - s / 2.0) ** 2 <= (s / 2.0) ** 2
    elif shape == "triangle":
        mask = np.abs(u) <= v / 2.0
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask.setflags(write=False)
    return mask


@lru_cache(maxsize=None)
def _mask_center(shape: str, s: int) -> tuple[float, float]:
    """Centre (x, y) of the mask's bounding box in box-local continuous coordinates (what detect sees)."""
    mask = _shape_mask(shape, s)
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max() + 1) / 2.0, (ys.min() + ys.max() + 1) / 2.0


def _rng(prompt: str, size: int, seed: int) -> np.random.Generator:
    """A generator seeded by (prompt, size, seed), stable across processes and platforms."""
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    digest = hashlib.sha256(f"{_RENDER_SALT}|{prompt}|{int(size)}".encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


def _scene(parsed: ParsedPrompt, rng: np.random.Generator) -> list[tuple[str, str]]:
    """The objects (shape, colour) to draw: exactly what the prompt asks, free colours drawn at random."""
    objects = []
    for shape, color in zip(parsed.shapes, parsed.colors):
        for _ in range(parsed.count):
            name = color if color is not None else _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))]
            objects.append((shape, name))
    return objects


def _valid_layouts(
    xy: np.ndarray, sides: np.ndarray, shapes: Sequence[str], parsed: ParsedPrompt, size: int
) -> np.ndarray:
    """Which of K candidate layouts ``xy`` (K, n, 2: box top-left corners) are valid.

    Valid: every pair of boxes is separated by ≥ GAP px along x or y; for position prompts additionally
    the boxes' centres differ along the relation's axis by ≥ half the larger side, and the drawn masks'
    bounding-box centres satisfy the verifier rule (c_A + 0.1·S < c_B, or its mirror).
    """
    n = len(sides)
    ok = np.ones(xy.shape[0], dtype=bool)
    for i in range(n):
        for j in range(i + 1, n):
            dx = (xy[:, i, 0] + sides[i] + GAP <= xy[:, j, 0]) | (xy[:, j, 0] + sides[j] + GAP <= xy[:, i, 0])
            dy = (xy[:, i, 1] + sides[i] + GAP <= xy[:, j, 1]) | (xy[:, j, 1] + sides[j] + GAP <= xy[:, i, 1])
            ok &= dx | dy
    if parsed.relation is not None:
        axis = 0 if parsed.relation in ("left of", "right of") else 1
        sign = 1.0 if parsed.relation in ("left of", "above") else -1.0  # want sign*(c_B − c_A) > ...
        box_a = xy[:, 0, axis] + sides[0] / 2.0
        box_b = xy[:, 1, axis] + sides[1] / 2.0
        ok &= sign * (box_b - box_a) >= max(sides[0], sides[1]) / 2.0
        det_a = xy[:, 0, axis] + _mask_center(shapes[0], int(sides[0]))[axis]
        det_b = xy[:, 1, axis] + _mask_center(shapes[1], int(sides[1]))[axis]
        ok &= sign * (det_b - det_a) > RELATION_MARGIN * size
    return ok


def _place(
    shapes: Sequence[str], parsed: ParsedPrompt, size: int, rng: np.random.Generator, candidates: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Draw object sides and box corners by vectorised rejection sampling.

    Sides are drawn uniformly in [lo, hi] and ``candidates`` random layouts are tested at once (4 rounds);
    when none is valid, hi shrinks by one towards lo and the sides are redrawn.
    """
    lo, hi = size_range(size)
    n = len(shapes)
    for upper in range(hi, lo - 1, -1):
        for _ in range(4):
            sides = rng.integers(lo, upper + 1, size=n)
            room = size - 2 * MARGIN - sides  # the corner ranges [MARGIN, MARGIN + room]
            if np.any(room < 0):
                continue
            xy = MARGIN + np.floor(rng.random((candidates, n, 2)) * (room[None, :, None] + 1)).astype(np.int64)
            valid = np.flatnonzero(_valid_layouts(xy, sides, shapes, parsed, size))
            if valid.size:
                return sides, xy[valid[0]]
    raise RuntimeError(f"could not place {n} objects for {parsed} on a {size}x{size} canvas")


def render(prompt: str, size: int = 32, seed: int = 0) -> np.ndarray:
    """Render a random scene that satisfies ``prompt``: a (size, size, 3) uint8 image.

    Deterministic in (prompt, size, seed) and varied across seeds: free colours, object sides in
    [round(0.28·S), round(0.38·S)] and positions are random. The scene holds exactly the objects the prompt
    asks for, every box ≥ 1 px inside the canvas and ≥ 2 px from every other box; for position prompts the
    relation holds with the verifier's margin. Every render scores 1.0 under the verifier for S ≥ 24
    (tested at 32, 48 and 64); at smaller S the objects get too small for the verifier's shape rules.
    """
    return render_parsed(parse(prompt), size, seed, key=prompt.strip())


def render_parsed(parsed: ParsedPrompt, size: int = 32, seed: int = 0, key: str = "") -> np.ndarray:
    """Render a random scene with exactly the meaning ``parsed`` (see :func:`render`).

    ``key`` is the text whose hash seeds the scene together with (size, seed): :func:`render` passes the
    prompt, so a render depends only on (prompt, size, seed).
    """
    size = int(size)
    rng = _rng(key, size, seed)
    objects = _scene(parsed, rng)
    shapes = [shape for shape, _ in objects]
    sides, xy = _place(shapes, parsed, size, rng)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for (shape, color), s, (x, y) in zip(objects, sides, xy):
        s, x, y = int(s), int(x), int(y)
        image[y : y + s, x : x + s][_shape_mask(shape, s)] = COLORS[color]
    return image


# --------------------------------------------------------------------------------------------------
# Verifier
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """A detected object.

    Attributes:
        color: palette colour name.
        shape: "square", "circle", "triangle" or "other".
        cx, cy: bounding-box centre in continuous pixel coordinates ((x0 + x1) / 2 with x1 exclusive).
        bbox: (x0, y0, x1, y1), x1 / y1 exclusive.
        area: pixels in the component.
    """

    color: str
    shape: str
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]
    area: int


def _as_image(image) -> np.ndarray:
    """Validate an image (uint8 HxWx3 numpy array with H == W, or a PIL image) and return it as numpy."""
    if not isinstance(image, np.ndarray):
        try:  # a PIL image (duck-typed so PIL stays an optional dependency here)
            image = np.asarray(image.convert("RGB"))
        except AttributeError:
            raise ValueError(
                f"image must be a uint8 numpy array of shape (S, S, 3) or a PIL image, got {type(image).__name__}"
            ) from None
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1] or image.shape[0] == 0:
        raise ValueError(f"image must have shape (S, S, 3) (square RGB), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 in [0, 255], got dtype {image.dtype}")
    return image


def _labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel colour labels (0 background, 1..4 palette in COLORS order).

    label = argmin_k ‖pixel − palette_k‖ over black + palette; a palette label whose distance exceeds 120
    becomes background.
    """
    pix = image.reshape(-1, 1, 3).astype(np.int32)
    d2 = ((pix - _PALETTE[None]) ** 2).sum(axis=-1)
    lab = d2.argmin(axis=1)
    lab[d2[np.arange(lab.size), lab] > BACKGROUND_DISTANCE**2] = 0
    return lab.reshape(image.shape[:2])


def _classify(w: int, h: int, area: int) -> str:
    """Shape from the bbox: aspect w/h outside [0.67, 1.5] → other; else by fill = area / (w·h)."""
    aspect = w / h
    if aspect < ASPECT_RANGE[0] or aspect > ASPECT_RANGE[1]:
        return "other"
    fill = area / (w * h)
    if fill >= FILL_SQUARE:
        return "square"
    if fill >= FILL_CIRCLE:
        return "circle"
    if fill >= FILL_TRIANGLE:
        return "triangle"
    return "other"


def detect(image) -> list[Obj]:
    """The verifier's objects: 4-connected components of one colour label with area ≥ 0.02·S².

    Objects come ordered by colour (COLORS order), then by the raster order of their first pixel.
    """
    image = _as_image(image)
    size = image.shape[0]
    min_area = MIN_AREA_FRACTION * size * size
    lab = _labels(image)
    counts = np.bincount(lab.ravel(), minlength=len(_PALETTE))
    objects: list[Obj] = []
    for k in range(1, len(_PALETTE)):
        if counts[k] < min_area:
            continue
        comp, n = ndimage.label(lab == k)  # default structure: 4-connectivity
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        for idx, sl in enumerate(ndimage.find_objects(comp), start=1):
            area = int(areas[idx])
            if sl is None or area < min_area:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            objects.append(
                Obj(
                    color=_COLOR_NAMES[k - 1],
                    shape=_classify(x1 - x0, y1 - y0, area),
                    cx=(x0 + x1) / 2.0,
                    cy=(y0 + y1) / 2.0,
                    bbox=(x0, y0, x1, y1),
                    area=area,
                )
            )
    return objects


def relation_holds(a: Obj, b: Obj, relation: str, size: int) -> bool:
    """Whether "a {relation} b" holds: e.g. left of ⇔ cx_a + 0.1·S < cx_b (y grows downwards)."""
    m = RELATION_MARGIN * size
    if relation == "left of":
        return a.cx + m < b.cx
    if relation == "right of":
        return b.cx + m < a.cx
    if relation == "above":
        return a.cy + m < b.cy
    if relation == "below":
        return b.cy + m < a.cy
    raise ValueError(f"unknown relation {relation!r}")


#: Near-miss credit of the soft partial score (not part of the spec: a training-reward shaping of ours).
NEAR_MISS_MAX = 0.5  # a near miss earns at most half of an atom's credit
NEAR_MISS_WIDTH = 0.15  # fill-ratio distance from the required band at which the credit reaches 0
_FILL_BANDS = {"square": (FILL_SQUARE, float("inf")), "circle": (FILL_CIRCLE, FILL_SQUARE),
               "triangle": (FILL_TRIANGLE, FILL_CIRCLE)}


def shape_credit(obj: Obj, shape: str) -> float:
    """How well a detected object counts as ``shape``: 1 when the verifier reads it as that shape, else a
    near-miss credit NEAR_MISS_MAX · max(0, 1 − d / NEAR_MISS_WIDTH), where d is the distance of the object's
    fill ratio area / (w·h) from the shape's band ([0.88, ∞) square, [0.66, 0.88) circle, [0.35, 0.66)
    triangle); 0 when the bbox aspect is outside [0.67, 1.5] (an elongated blob is no near miss).

    E.g. a square drawn with rounded corners, fill 0.84, earns 0.5·(1 − 0.04/0.15) ≈ 0.37 towards "square".
    """
    if obj.shape == shape:
        return 1.0
    x0, y0, x1, y1 = obj.bbox
    aspect = (x1 - x0) / (y1 - y0)
    if aspect < ASPECT_RANGE[0] or aspect > ASPECT_RANGE[1]:
        return 0.0
    fill = obj.area / ((x1 - x0) * (y1 - y0))
    lo, hi = _FILL_BANDS[shape]
    distance = lo - fill if fill < lo else fill - hi
    return NEAR_MISS_MAX * max(0.0, 1.0 - max(distance, 0.0) / NEAR_MISS_WIDTH)


def _presence(objects: list[Obj], shape: str, color: str | None, soft: bool) -> float:
    """[some object is ``shape`` (in ``color``)], or with ``soft`` its best :func:`shape_credit`."""
    candidates = [o for o in objects if color is None or o.color == color]
    if not soft:
        return float(any(o.shape == shape for o in candidates))
    return max((shape_credit(o, shape) for o in candidates), default=0.0)


def _atoms(objects: list[Obj], parsed: ParsedPrompt, size: int, soft: bool = False) -> tuple[bool, float]:
    """(strict pass, partial score) of detected objects against a parsed prompt. See :func:`partial_score`;
    ``soft`` replaces each presence atom by its near-miss credit (:func:`soft_partial_score`)."""
    of = {s: [o for o in objects if o.shape == s] for s in parsed.shapes}
    cat = parsed.category
    if cat == "single_object":
        ok = bool(of[parsed.shapes[0]])
        return ok, _presence(objects, parsed.shapes[0], None, soft)
    if cat == "two_object":
        a, b = (bool(of[s]) for s in parsed.shapes)
        return a and b, 0.5 * sum(_presence(objects, s, None, soft) for s in parsed.shapes)
    if cat == "counting":
        n, target = len(of[parsed.shapes[0]]), parsed.count
        count_atom = max(0.0, 1.0 - abs(n - target) / target)
        if parsed.colors[0] is None:
            return n == target, count_atom
        colored = n > 0 and all(o.color == parsed.colors[0] for o in of[parsed.shapes[0]])
        return n == target and colored, 0.5 * count_atom + 0.5 * colored
    if cat == "colors":
        present = of[parsed.shapes[0]]
        all_colored = bool(present) and all(o.color == parsed.colors[0] for o in present)
        return all_colored, 0.5 * _presence(objects, parsed.shapes[0], None, soft) + 0.5 * all_colored
    if cat == "position":
        objs_a, objs_b = ([o for o in of[s] if c is None or o.color == c] for s, c in zip(parsed.shapes, parsed.colors))
        rel = any(relation_holds(a, b, parsed.relation, size) for a in objs_a for b in objs_b)
        present = sum(_presence(objects, s, c, soft) for s, c in zip(parsed.shapes, parsed.colors))
        return rel, (present + rel) / 3.0
    if cat == "color_attr":
        hits = [_presence(objects, s, c, soft) for s, c in zip(parsed.shapes, parsed.colors)]
        return all(h == 1.0 for h in hits), 0.5 * hits[0] + 0.5 * hits[1]
    raise AssertionError(f"unhandled category {cat!r}")


def score_parsed(image, parsed: ParsedPrompt) -> float:
    """Strict score (1.0 or 0.0) of an image for any meaning: :func:`score`'s rules, where a colour given on
    an object of a counting or position meaning also binds: counting "N C X" needs exactly N objects of
    shape X, all in colour C; position "C₁ A rel C₂ B" needs some A in C₁ and some B in C₂ in the relation.
    """
    image = _as_image(image)
    return float(_atoms(detect(image), parsed, image.shape[0])[0])


def partial_score_parsed(image, parsed: ParsedPrompt) -> float:
    """Partial score in [0, 1] of an image for any meaning: :func:`partial_score`'s atoms, with a colour on
    a counting or position meaning binding as follows (``None`` colours give the benchmark formulas):

    * counting with colour C: ½·max(0, 1 − |n_X − N| / N) + ½·[n_X ≥ 1 and every object of shape X in C];
    * position with colours: ⅓·[some A in C₁] + ⅓·[some B in C₂] + ⅓·[some such A, B pair satisfies it].

    It is 1 exactly when :func:`score_parsed` is 1.
    """
    image = _as_image(image)
    return float(_atoms(detect(image), parsed, image.shape[0])[1])


def score(image, prompt: str) -> float:
    """Strict score (1.0 or 0.0) of an image for a prompt (spec rule 5).

    single_object: ≥ 1 object of the shape; two_object: ≥ 1 of each shape; counting: exactly N objects of
    the shape (other shapes are ignored); colors: ≥ 1 of the shape and all objects of that shape in the
    colour; position: some A and some B in the relation; color_attr: some (shape1, color1) and some
    (shape2, color2). Images of any square size S are accepted.
    """
    image = _as_image(image)
    return float(_atoms(detect(image), parse(prompt), image.shape[0])[0])


def partial_score(image, prompt: str) -> float:
    """Partial score in [0, 1]: the fraction of the prompt's atomic requirements met (spec rule 6).

    Atoms per category (n_X = detected objects of shape X):

    * single_object: [n_shape ≥ 1].
    * two_object: ½·[n_shape1 ≥ 1] + ½·[n_shape2 ≥ 1].
    * counting: max(0, 1 − |n_shape − N| / N).
    * colors: ½·[n_shape ≥ 1] + ½·[n_shape ≥ 1 and every object of the shape has the colour].
    * position: ⅓·[n_A ≥ 1] + ⅓·[n_B ≥ 1] + ⅓·[some A, B pair satisfies the relation].
    * color_attr: ½·[some shape1 in color1] + ½·[some shape2 in color2].

    partial_score is 1 exactly when :func:`score` is 1, and 0 on a blank image.
    """
    image = _as_image(image)
    return float(_atoms(detect(image), parse(prompt), image.shape[0])[1])


def soft_partial_score(image, prompt: str) -> float:
    """Partial score with near-miss credit, in [0, 1] — a training reward of ours, not part of the spec.

    The atoms of :func:`partial_score`, except that each "some object of shape X (in colour C)" atom
    earns max over the objects (of colour C) of :func:`shape_credit` instead of 0/1: a square drawn with
    rounded corners (read as a circle) earns up to NEAR_MISS_MAX of the square's atom, more the closer its
    fill ratio is to the square's band. Counting and relations stay exact. So the score orders near misses
    that the partial score ties at 0 — the within-group signal that group-relative methods learn from —
    while a correct object always outranks a near miss; it equals the partial score on any image whose
    objects all read as the shapes asked (renders), and is 1 exactly when :func:`score` is 1.
    """
    image = _as_image(image)
    return float(_atoms(detect(image), parse(prompt), image.shape[0], soft=True)[1])


def _pairs(images, prompts: Sequence[str] | str) -> Iterable[tuple[np.ndarray, str]]:
    """Zip images with prompts (a single prompt applies to every image); lengths must match."""
    images = list(images) if not isinstance(images, np.ndarray) else images
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return zip(images, prompts)


def score_batch(images, prompts: Sequence[str] | str) -> np.ndarray:
    """Strict scores (float64 array of 0/1) for images (N,S,S,3 array or a list) and their prompts."""
    return np.array([score(im, p) for im, p in _pairs(images, prompts)], dtype=np.float64)


def partial_score_batch(images, prompts: Sequence[str] | str) -> np.ndarray:
    """Partial scores (float64 array in [0, 1]) for images and their prompts."""
    return np.array([partial_score(im, p) for im, p in _pairs(images, prompts)], dtype=np.float64)


def soft_partial_score_batch(images, prompts: Sequence[str] | str) -> np.ndarray:
    """Soft partial scores (:func:`soft_partial_score`, float64 in [0, 1]) for images and their prompts."""
    return np.array([soft_partial_score(im, p) for im, p in _pairs(images, prompts)], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Task metric
# --------------------------------------------------------------------------------------------------


def geneval(scores_by_prompt: dict[str, Sequence[float]]) -> dict:
    """The world's task metric ("shapes-geneval") from strict scores grouped by prompt.

    per_category[c] = mean over the prompts of category c of the prompt's mean score (each prompt weighs
    the same; with equally many images per prompt this is the plain mean over images, as in GenEval);
    overall = mean of per_category over the categories present. Prompts with no scores are skipped.
    Returns ``{"overall": float, "per_category": {category: float}}`` (categories in CATEGORIES order).
    """
    by_cat: dict[str, list[float]] = {}
    for prompt, values in scores_by_prompt.items():
        values = np.asarray(list(values), dtype=np.float64)
        if values.size == 0:
            continue
        by_cat.setdefault(category(prompt), []).append(float(values.mean()))
    per_category = {c: float(np.mean(by_cat[c])) for c in CATEGORIES if c in by_cat}
    overall = float(np.mean(list(per_category.values()))) if per_category else float("nan")
    return {"overall": overall, "per_category": per_category}


def geneval_standard_error(scores_by_prompt: dict[str, Sequence[float]]) -> float:
    """The seed noise of :func:`geneval`: the standard error of ``overall`` over fresh draws of the images,
    the prompts held fixed — ``Var(overall) = Σ_p w_p²·s_p² / n_p`` with w_p = 1 / (C·P_c), s_p² the unbiased
    variance of prompt p's n_p scores (0 for one image); computed by
    :func:`dgpo.worlds.categories.mean_by_category`, the one aggregation both worlds share. The difference of
    two independent evaluations has standard error √(SE₁² + SE₂²). NaN when nothing was scored."""
    from dgpo.worlds.categories import mean_by_category
    return mean_by_category({p: list(v) for p, v in scores_by_prompt.items()}, category)["se"]
