"""Synthetic birds: a small fine-grained dataset drawn on the fly for the demo and fast tests.

Classes differ only in small parts (bill length, crown colour, wing bar, eye ring, breast
pattern); everything else (pose, facing, scale, position, plumage base colour, background clutter,
lighting, noise) is nuisance shared by all classes. So, like real fine-grained data, a model must
look at a few small regions and ignore most of the picture.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from finegrain.data.manifest import Manifest
from finegrain.errors import FinegrainError

log = logging.getLogger("finegrain")

BILLS = ("short", "long")
CROWNS = {"red": (205, 35, 30), "blue": (40, 80, 210), "yellow": (240, 200, 20)}
BREASTS = ("plain", "spotted", "streaked")
BODY_COLORS = ((120, 95, 70), (150, 140, 125), (95, 100, 80), (170, 150, 110), (110, 110, 115))


@dataclass(frozen=True)
class Species:
    """The class-defining attributes of a synthetic bird."""

    bill: str
    crown: str
    wing_bar: bool
    eye_ring: bool
    breast: str

    @property
    def name(self) -> str:
        """A readable, filesystem-safe class name, e.g. 'long-bill_red-crown_spotted_wingbar_eyering'."""
        return "_".join([
            f"{self.bill}-bill", f"{self.crown}-crown", self.breast,
            "wingbar" if self.wing_bar else "plainwing", "eyering" if self.eye_ring else "noring",
        ])


ALL_SPECIES = tuple(
    Species(b, c, w, e, br)
    for b, c, w, e, br in itertools.product(BILLS, CROWNS, (False, True), (False, True), BREASTS)
)


@dataclass(frozen=True)
class Nuisance:
    """Everything about a picture that is not the species. Angles in degrees, positions as fractions."""

    angle: float
    facing_left: bool
    scale: float
    cx: float
    cy: float
    body: tuple[int, int, int]
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    clutter_seed: int
    brightness: float
    cast: tuple[float, float, float]
    noise_seed: int


def sample_nuisance(rng: np.random.Generator) -> Nuisance:
    """Draw random nuisance factors."""
    base = np.array(BODY_COLORS[rng.integers(len(BODY_COLORS))], dtype=float)
    body = tuple(int(v) for v in np.clip(base + rng.normal(0, 12, 3), 0, 255))
    sky = tuple(int(v) for v in rng.integers(120, 235, 3))
    ground = tuple(int(v) for v in rng.integers(40, 150, 3))
    return Nuisance(
        angle=float(rng.uniform(-25, 25)), facing_left=bool(rng.integers(2)), scale=float(rng.uniform(0.75, 1.05)),
        cx=float(rng.uniform(0.4, 0.6)), cy=float(rng.uniform(0.42, 0.58)), body=body, sky=sky, ground=ground,
        clutter_seed=int(rng.integers(2**31)), brightness=float(rng.uniform(0.65, 1.25)),
        cast=tuple(float(v) for v in rng.uniform(0.88, 1.12, 3)), noise_seed=int(rng.integers(2**31)),
    )


def _background(n: Nuisance, size: int) -> Image.Image:
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    grad = (1 - t) * np.array(n.sky) + t * np.array(n.ground)
    img = Image.fromarray(np.broadcast_to(grad, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng(n.clutter_seed)
    for _ in range(int(rng.integers(2, 5))):  # branches
        y = rng.uniform(0.3, 0.95) * size
        draw.line([(0, y), (size, y + rng.uniform(-0.3, 0.3) * size)], fill=tuple(int(v) for v in rng.integers(50, 110, 3)), width=int(size * rng.uniform(0.01, 0.03)))
    for _ in range(int(rng.integers(6, 16))):  # leaves and blobs, some in crown-like colours
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.015, 0.06) * size
        colour = tuple(int(v) for v in (rng.integers(30, 230, 3) if rng.random() < 0.3 else (rng.integers(30, 90), rng.integers(90, 170), rng.integers(30, 80))))
        draw.ellipse([x - r, y - 0.6 * r, x + r, y + 0.6 * r], fill=colour)
    return img


def _bird_layer(s: Species, n: Nuisance, L: int) -> Image.Image:
    """The bird facing right on a transparent L x L layer."""
    layer = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    body = n.body + (255,)
    dark = tuple(int(v * 0.6) for v in n.body) + (255,)
    light = tuple(int(min(255, v * 1.35 + 40)) for v in n.body) + (255,)
    u = L / 100.0
    d.polygon([(27 * u, 52 * u), (8 * u, 44 * u), (9 * u, 62 * u)], fill=dark)  # tail
    d.line([(44 * u, 66 * u), (42 * u, 78 * u)], fill=(60, 50, 40, 255), width=max(1, int(1.2 * u)))  # legs
    d.line([(52 * u, 66 * u), (53 * u, 78 * u)], fill=(60, 50, 40, 255), width=max(1, int(1.2 * u)))
    d.ellipse([23 * u, 42 * u, 67 * u, 68 * u], fill=body)  # body
    d.ellipse([50 * u, 54 * u, 66 * u, 67 * u], fill=light)  # breast patch
    if s.breast == "spotted":
        for bx, by in ((53, 57), (58, 59), (62, 57), (55, 62), (60, 64), (64, 61)):
            d.ellipse([(bx - 1.1) * u, (by - 1.1) * u, (bx + 1.1) * u, (by + 1.1) * u], fill=(45, 35, 30, 255))
    elif s.breast == "streaked":
        for bx in (53, 57, 61, 64):
            d.line([(bx * u, 56 * u), ((bx - 1) * u, 64 * u)], fill=(45, 35, 30, 255), width=max(1, int(0.9 * u)))
    d.ellipse([30 * u, 45 * u, 56 * u, 58 * u], fill=dark)  # wing
    if s.wing_bar:
        d.line([(37 * u, 46 * u), (42 * u, 57 * u)], fill=(245, 245, 240, 255), width=max(1, int(1.8 * u)))
    hx, hy, hr = 68 * u, 42 * u, 9 * u
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=body)  # head
    d.pieslice([hx - hr, hy - hr, hx + hr, hy + hr], 200, 330, fill=CROWNS[s.crown] + (255,))  # crown
    bill_len = (6 if s.bill == "short" else 15) * u
    d.polygon([(hx + 0.8 * hr, hy - 2 * u), (hx + 0.8 * hr + bill_len, hy + 0.5 * u), (hx + 0.8 * hr, hy + 2.5 * u)], fill=(230, 170, 60, 255))
    ex, ey = hx + 3.5 * u, hy - 1.5 * u
    if s.eye_ring:
        rr = 2.6 * u
        d.ellipse([ex - rr, ey - rr, ex + rr, ey + rr], fill=(250, 250, 250, 255))
    er = 1.4 * u
    d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(10, 10, 10, 255))
    return layer


def render_bird(species: Species, nuisance: Nuisance, size: int = 128) -> Image.Image:
    """Draw one `size` x `size` RGB picture of `species` under `nuisance` (2x supersampled)."""
    big = 2 * size
    canvas = _background(nuisance, big)
    bird = _bird_layer(species, nuisance, big)
    if nuisance.facing_left:
        bird = bird.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    bird = bird.rotate(nuisance.angle, resample=Image.Resampling.BICUBIC)
    side = max(8, int(big * nuisance.scale))
    bird = bird.resize((side, side), Image.Resampling.BICUBIC)
    canvas.paste(bird, (int(nuisance.cx * big - side / 2), int(nuisance.cy * big - side / 2)), bird)
    img = canvas.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img).astype(np.float32) * nuisance.brightness * np.array(nuisance.cast, dtype=np.float32)
    arr += np.random.default_rng(nuisance.noise_seed).normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_demo_dataset(
    out_dir: str | os.PathLike,
    *,
    classes: int = 12,
    per_class: int = 40,
    image_size: int = 128,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Manifest:
    """Write a synthetic bird dataset and its manifest (`OUT/manifest.csv`).

    Images go to `OUT/images/<class>/<class>_NNNN.jpg` (JPEG, `image_size` px square); per class,
    round(per_class * test_fraction) images are test, the rest train.

    Args:
        out_dir: output folder (created).
        classes: number of species, 2..72 (drawn without replacement from the attribute grid).
        per_class: images per species (>= 2).
        image_size: side of each image in pixels (>= 32).
        test_fraction: fraction of each class in the test split.
        seed: random seed; the same arguments always give the same files.
    """
    if not 2 <= classes <= len(ALL_SPECIES):
        raise FinegrainError(f"classes must be between 2 and {len(ALL_SPECIES)}, got {classes}")
    if per_class < 2:
        raise FinegrainError(f"per_class must be at least 2, got {per_class}")
    if image_size < 32:
        raise FinegrainError(f"image_size must be at least 32, got {image_size}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    chosen = [ALL_SPECIES[i] for i in sorted(rng.choice(len(ALL_SPECIES), size=classes, replace=False))]
    n_test = min(per_class - 1, max(1, math.floor(per_class * test_fraction + 0.5))) if test_fraction > 0 else 0
    rows = []
    for species in chosen:
        folder = out / "images" / species.name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rel = f"images/{species.name}/{species.name}_{k:04d}.jpg"
            render_bird(species, sample_nuisance(rng), image_size).save(out / rel, quality=92)
            rows.append({"image_id": f"{species.name}_{k:04d}", "path": rel, "label": species.name,
                         "split": "test" if k >= per_class - n_test else "train"})
    manifest = Manifest.from_table(pd.DataFrame(rows), out)
    manifest.save(out / "manifest.csv")
    log.info("demo data: %d images of %d species in %s", len(rows), classes, out)
    return manifest
