"""The procedural world: attribute vocabularies, scene sampling, rendering and captions.

Everything here is a pure function of an integer seed, so a dataset is reproducible
byte for byte from (seed, split, index) and never has to be downloaded or shipped.
Images are 32x32 RGB: small enough that a latent diffusion model with a 4x8x8 latent
trains on two CPU cores, large enough that five shapes stay distinguishable.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
# Drawing at 4x and box-filtering down gives anti-aliased edges; smooth edges make the
# VAE's job (and its PSNR) depend on the shapes rather than on aliasing noise.
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 200),
    "orange": (250, 135, 20),
    "cyan": (40, 205, 220),
    "pink": (250, 130, 190),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
# Object extent in pixels (before the +-6% size jitter).
SIZE_PX = {"small": 8.0, "large": 13.0}
POSITIONS = ("top left", "top right", "center", "bottom left", "bottom right")
POSITION_XY = {
    "top left": (8.5, 8.5),
    "top right": (23.5, 8.5),
    "center": (16.0, 16.0),
    "bottom left": (8.5, 23.5),
    "bottom right": (23.5, 23.5),
}
# Corners only for two-object scenes: a large centred object would overlap any corner.
CORNERS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
BACKGROUND_NAMES = tuple(BACKGROUNDS)

# Shape/colour pairs that never occur in the train or validation splits: the
# held-out-combination split is made of scenes that contain at least one of them, so a
# model that composes "green" and "circle" it only saw apart can be measured.
HELDOUT_PAIRS = frozenset(
    (SHAPES[i], COLOUR_NAMES[(3 * i + 1) % len(COLOUR_NAMES)]) for i in range(len(SHAPES))
)


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    position: str
    # Sub-pixel jitter so that two scenes with the same labels are different images.
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[WorldObject, ...]  # sorted in reading order of their positions

    def labels(self) -> dict:
        """Exact attribute labels, in a flat form that a `datasets` schema can hold."""
        objs = [asdict(o) for o in self.objects]
        return {
            "background": self.background,
            "num_objects": len(objs),
            "shapes": [o["shape"] for o in objs],
            "colours": [o["colour"] for o in objs],
            "sizes": [o["size"] for o in objs],
            "positions": [o["position"] for o in objs],
        }

    def has_heldout_pair(self) -> bool:
        return any((o.shape, o.colour) in HELDOUT_PAIRS for o in self.objects)


def _sample_object(rng: random.Random, position: str) -> WorldObject:
    return WorldObject(
        shape=rng.choice(SHAPES),
        colour=rng.choice(COLOUR_NAMES),
        size=rng.choice(SIZES),
        position=position,
        dx=rng.uniform(-0.75, 0.75),
        dy=rng.uniform(-0.75, 0.75),
        scale=rng.uniform(0.94, 1.06),
    )


def sample_scene(rng: random.Random, num_objects: int | None = None) -> Scene:
    """One random scene; `num_objects` None draws 1 or 2 with equal odds."""
    n = num_objects if num_objects is not None else rng.choice((1, 2))
    if n == 1:
        positions = [rng.choice(POSITIONS)]
    elif n == 2:
        positions = sorted(rng.sample(CORNERS, 2), key=POSITIONS.index)
    else:
        raise ValueError("the world has scenes of 1 or 2 objects")
    objs = tuple(_sample_object(rng, p) for p in positions)
    return Scene(background=rng.choice(BACKGROUND_NAMES), objects=objs)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon (in supersampled pixels) of a shape with half-extent r around (cx, cy)."""
    if shape == "square":
        s = r * 0.86  # a square looks bigger than a circle of the same extent
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        a = r * 0.36  # half arm width
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]
    raise ValueError(shape)


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as a 32x32 RGB PIL image."""
    k = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        x0, y0 = POSITION_XY[o.position]
        cx, cy = (x0 + o.dx) * k, (y0 + o.dy) * k
        r = SIZE_PX[o.size] * o.scale * k / 2
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_polygon(o.shape, cx, cy, r), fill=fill)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def render_array(scene: Scene) -> np.ndarray:
    return np.asarray(render_scene(scene), dtype=np.uint8)


# ----------------------------------------------------------------------------- captions

SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big")}
POSITION_PHRASES = {
    "center": ("in the center", "in the middle", "at the center"),
    "top left": ("in the top left corner", "in the top left", "at the upper left"),
    "top right": ("in the top right corner", "in the top right", "at the upper right"),
    "bottom left": ("in the bottom left corner", "in the bottom left", "at the lower left"),
    "bottom right": ("in the bottom right corner", "in the bottom right", "at the lower right"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: random.Random, o: WorldObject) -> str:
    size = rng.choice(SIZE_WORDS[o.size])
    np_ = f"{size} {o.colour} {o.shape}"
    return f"{_article(np_)} {np_}"


def _relation(a: WorldObject, b: WorldObject) -> str:
    """How a stands to b, for two distinct corners."""
    ax, ay = POSITION_XY[a.position]
    bx, by = POSITION_XY[b.position]
    vert = "above" if ay < by else "below" if ay > by else ""
    horiz = "to the left of" if ax < bx else "to the right of" if ax > bx else ""
    if vert and horiz:
        return f"{vert} and {horiz}"
    return vert or horiz


SINGLE_TEMPLATES = (
    "{np} {pos} on a {bg} background",
    "{np} {pos}",
    "{Pos}, {np} on {bg}",
    "there is {np} {pos}",
    "{a_colour_shape} {pos}. it is {size}.",
    "{bg} background with {np} {pos}",
    "the {shape} is {colour} and {size}, {pos}",
    "a picture of {np} {pos}",
)
PAIR_TEMPLATES = (
    "{np1} {pos1} and {np2} {pos2}",
    "{np1} {rel12} {np2}",
    "{np2} {rel21} {np1}, on a {bg} background",
    "{np1} {pos1}, {rel12} {np2}",
    "two shapes on {bg}: {np1} {pos1} and {np2} {pos2}",
    "{np2} {pos2} and {np1} {pos1}",
)


def caption_scene(scene: Scene, rng: random.Random) -> str:
    """A natural-language caption; several templates and synonyms per labelled scene."""
    bg = scene.background
    if len(scene.objects) == 1:
        o = scene.objects[0]
        cs = f"{o.colour} {o.shape}"
        pos = rng.choice(POSITION_PHRASES[o.position])
        text = rng.choice(SINGLE_TEMPLATES).format(
            np=_noun_phrase(rng, o), pos=pos, Pos=pos, bg=bg, shape=o.shape, colour=o.colour,
            size=rng.choice(SIZE_WORDS[o.size]), a_colour_shape=f"{_article(cs)} {cs}",
        )
    else:
        o1, o2 = scene.objects
        text = rng.choice(PAIR_TEMPLATES).format(
            np1=_noun_phrase(rng, o1), np2=_noun_phrase(rng, o2),
            pos1=rng.choice(POSITION_PHRASES[o1.position]),
            pos2=rng.choice(POSITION_PHRASES[o2.position]),
            rel12=_relation(o1, o2), rel21=_relation(o2, o1), bg=bg,
        )
    return text


def canonical_caption(shape: str, colour: str, size: str, position: str, background: str) -> str:
    """The first single-object template with canonical words: used for evaluation prompts."""
    np_ = f"{size} {colour} {shape}"
    return f"{_article(np_)} {np_} {POSITION_PHRASES[position][0]} on a {background} background"
