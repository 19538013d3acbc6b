"""The synthetic world's vocabulary: shapes, colours, textures, backgrounds, concepts, the classes
and the shifted splits' ranges. training/data/paint.py draws it; training/data/synth.py writes the
dataset files.

The world (all sizes scale with the image side ``S``; numbers below are for ``S = 112``):

* every image has one **key object** (radius ~15-21 px) and 1-3 smaller **distractors**;
* key objects are a circle, square or triangle, filled with stripes, polka dots or a
  checkerboard (the six *texture classes*, each shape and each texture in two classes, so no
  single concept names the class), or a solid circle that is either a **balloon** (upper part of
  the image, with a string) or a **ball** (lower part, resting on grass): the two *positional
  classes* differ in where the circle is *and* in a concept (string / grass), so pooled concept
  scores still separate them;
* distractors are solid rings, crosses or stars; object colours (red, green, blue, yellow,
  purple) are drawn at random for key and distractors alike, so colour never gives the class away;
* backgrounds are plain, a gradient, or blocky noise, in muted colours (never the object palette).

Two **shifted** splits test what the train split never showed (written by default, see
:data:`training.data.synth.SIZE_PRESETS`; :data:`SHIFT` holds their ranges):

* ``shifted``: one key object per image, as in the other splits, but images of other sizes and aspect
  ratios (short side 80-224 px, width/height 0.6-1.7), key objects from 0.08 to 0.40 of the short side
  (a balloon up to 0.30: it needs the sky above its string) instead of 0.13-0.19 (the large ones cover a
  third of the frame, as ImageNet-segmentation objects do) and backgrounds of kinds the train split never
  has (a vignette, soft blotches, two tones split by a line), which carry no background concept;
* ``shifted-pairs``: two key objects of two different classes in one image (radius 0.10-0.20 of the
  short side, never overlapping), in the folder of the first; the mask file adds ``objects`` (bool
  ``[2, H, W]``, each object's own silhouette) and ``classes`` (int ``[2]``).

Concept masks are boolean ``[M, S, S]`` with occlusion resolved (a pixel belongs to the top-most
layer: background, grass, distractors, string, key object). A class is a linear function of
concept *presence*: each class has a unique pair of concepts (shape + texture, or circle +
string/grass) and distractors never carry a class concept.
"""
from __future__ import annotations

from dataclasses import dataclass

KEY_SHAPES = ("circle", "square", "triangle")
DISTRACTOR_SHAPES = ("ring", "cross", "star")
COLOURS = {  # base RGB of the object palette; each object jitters it a little
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
}
TEXTURES = {"stripes": "stripes", "polka dots": "dots", "checkerboard": "checker"}
BACKGROUNDS = {"plain background": "plain", "gradient background": "gradient", "noisy background": "noise"}

CONCEPTS: tuple[str, ...] = (
    *KEY_SHAPES, *DISTRACTOR_SHAPES, *COLOURS, *TEXTURES, "string", "grass", *BACKGROUNDS,
)
CONCEPT_INDEX = {name: i for i, name in enumerate(CONCEPTS)}


@dataclass(frozen=True)
class ClassRule:
    """What the key object of a class looks like and where it goes."""

    name: str
    shape: str
    texture: str | None  # concept name from TEXTURES, None = solid
    placement: str = "anywhere"  # "anywhere" | "balloon" (top, string) | "ball" (bottom, grass)


CLASSES: tuple[ClassRule, ...] = (
    ClassRule("striped_circle", "circle", "stripes"),
    ClassRule("dotted_square", "square", "polka dots"),
    ClassRule("checkered_triangle", "triangle", "checkerboard"),
    ClassRule("striped_square", "square", "stripes"),
    ClassRule("dotted_triangle", "triangle", "polka dots"),
    ClassRule("checkered_circle", "circle", "checkerboard"),
    ClassRule("balloon", "circle", None, "balloon"),
    ClassRule("ball", "circle", None, "ball"),
)
CLASS_NAMES: tuple[str, ...] = tuple(rule.name for rule in CLASSES)


@dataclass(frozen=True)
class Shift:
    """The ranges of the shifted splits (module docstring)."""

    short_side: tuple[int, int] = (80, 224)
    aspect: tuple[float, float] = (0.6, 1.7)  # width / height, drawn log-uniformly
    key_radius: tuple[float, float] = (0.08, 0.40)  # of the short side (train: 0.13-0.19)
    balloon_radius: float = 0.30  # a balloon larger than this leaves no sky for its string
    pair_radius: tuple[float, float] = (0.10, 0.20)
    backgrounds: tuple[str, ...] = ("vignette", "blotches", "two-tone")


SHIFT = Shift()
IN_DISTRIBUTION_RADIUS = (0.13, 0.19)
