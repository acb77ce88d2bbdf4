"""Albumentations view recipes: named, overridable, bounding-box aware.

A recipe is a `ViewRecipe` dataclass; `make_recipe("simclr", image_size=128, grayscale_p=0.0)`
takes a named preset and overrides fields; `build_view(recipe)` turns it into a callable
`(pixels (H, W, 3) uint8, bbox (x, y, w, h) | None) -> (3, S, S) float32 tensor`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import finegrain  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations is imported)
from finegrain.errors import FinegrainError
from finegrain.registry import VIEW_RECIPES

if TYPE_CHECKING:  # numpy is not imported for help text (the registry of recipes is read then)
    import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewRecipe:
    """How one view of an image is made. Sizes in pixels, probabilities in [0, 1].

    train views: random resized crop (area fraction `crop_scale`) -> flip -> colour jitter
    (with probability `color_jitter_p`) -> grayscale -> Gaussian blur -> solarize -> normalise.
    When the image has a bounding box and `bbox_safe` is set, the random crop keeps the whole
    box in view (albumentations RandomSizedBBoxSafeCrop) instead.
    eval views (`train=False`): optional crop to the box (plus `bbox_margin`), resize the shorter
    side to image_size / crop_pct, center crop, normalise.
    """

    name: str = "custom"
    train: bool = True
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0
    bbox_safe: bool = True
    crop_to_bbox: bool = False
    bbox_margin: float = 0.1
    crop_pct: float = 0.875

    def to_dict(self) -> dict:
        """Plain dict (tuples as lists) for configs and artifact.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


RECIPES: dict[str, dict] = {
    # SimCLR (Chen et al. 2020) as in its paper: strong crops, colour distortion, blur.
    "simclr": dict(name="simclr"),
    # Fine-grained fine-tuning: crop + flip only. Colour is a species cue (see LIBRARY_NOTES.md).
    "supcon": dict(name="supcon", crop_scale=(0.35, 1.0), color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
    # Self-supervised views that keep every colour's hue: SimCLR's crops and blur, brightness and
    # contrast jitter only (no saturation, hue or grayscale), for species told apart by colour.
    "color_safe": dict(name="color_safe", crop_scale=(0.2, 1.0), saturation=0.0, hue=0.0, grayscale_p=0.0),
    "eval": dict(name="eval", train=False),
}


for _name, _description in (("simclr", "strong crops, colour distortion, blur"), ("supcon", "crop + flip only"),
                             ("color_safe", "strong crops, blur, brightness/contrast only: hues kept"),
                             ("eval", "resize + centre crop")):
    VIEW_RECIPES.add(_name, RECIPES[_name], _description)


def make_recipe(name: str, **overrides) -> ViewRecipe:
    """A named preset ("simclr", "supcon", "eval") with fields overridden.

    Raises:
        FinegrainError: unknown recipe name or field.
    """
    if name not in RECIPES:
        raise FinegrainError(f"unknown view recipe {name!r}; choose one of {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(ViewRecipe)}
    unknown = set(overrides) - fields
    if unknown:
        raise FinegrainError(f"unknown view option(s) {sorted(unknown)}; known: {', '.join(sorted(fields))}")
    values = {**RECIPES[name], **overrides}
    for key in ("mean", "std", "crop_scale"):
        if key in values:
            values[key] = tuple(values[key])
    recipe = ViewRecipe(**values)
    if recipe.image_size < 8:
        raise FinegrainError(f"image_size must be at least 8 px, got {recipe.image_size}")
    return recipe


def _odd(n: float) -> int:
    n = max(3, int(n))
    return n if n % 2 else n + 1


class View:
    """A callable view built from a recipe.

    Call: `view(pixels, bbox=None)` with pixels (H, W, 3) uint8 RGB and bbox (x, y, w, h) in
    pixel coordinates of `pixels`; returns a (3, S, S) float32 tensor, S = recipe.image_size.
    """

    def __init__(self, recipe: ViewRecipe, seed: int | None = None):
        # imported here: the recipes (and `--views` help) are read without albumentations and torch
        import albumentations as A
        from albumentations.pytorch import ToTensorV2

        self.recipe = recipe
        s = recipe.image_size
        tail = [
            A.Normalize(mean=recipe.mean, std=recipe.std, max_pixel_value=255.0),
            ToTensorV2(),
        ]
        if not recipe.train:
            resize = int(round(s / recipe.crop_pct))
            self._plain = A.Compose([A.SmallestMaxSize(max_size=resize), A.CenterCrop(s, s), *tail], seed=seed)
            self._boxed = None
            return
        photometric = []
        if recipe.flip_p > 0:
            photometric.append(A.HorizontalFlip(p=recipe.flip_p))
        if recipe.color_jitter_p > 0:
            photometric.append(A.ColorJitter(
                brightness=recipe.brightness, contrast=recipe.contrast, saturation=recipe.saturation,
                hue=recipe.hue, p=recipe.color_jitter_p,
            ))
        if recipe.grayscale_p > 0:
            photometric.append(A.ToGray(p=recipe.grayscale_p))
        if recipe.blur_p > 0:
            photometric.append(A.GaussianBlur(blur_limit=(3, _odd(0.1 * s)), sigma_limit=(0.1, 2.0), p=recipe.blur_p))
        if recipe.solarize_p > 0:
            photometric.append(A.Solarize(threshold_range=(0.5, 0.5), p=recipe.solarize_p))
        crop = A.RandomResizedCrop(size=(s, s), scale=recipe.crop_scale)
        self._plain = A.Compose([crop, *photometric, *tail], seed=seed)
        self._boxed = None
        if recipe.bbox_safe:
            self._boxed = A.Compose(
                [A.RandomSizedBBoxSafeCrop(height=s, width=s), *photometric, *tail],
                bbox_params=A.BboxParams(format="coco", label_fields=["bbox_labels"], clip=True),
                seed=seed,
            )

    def reseed(self, seed: int) -> None:
        """Reset the random state, so the next call is a function of `seed` alone."""
        self._plain.set_random_seed(seed)
        if self._boxed is not None:
            self._boxed.set_random_seed(seed)

    def __call__(self, pixels: np.ndarray, bbox=None):
        has_box = bbox is not None and not math.isnan(bbox[2]) and bbox[2] > 0 and bbox[3] > 0
        if has_box:
            h, w = pixels.shape[:2]
            x0, y0 = max(0.0, float(bbox[0])), max(0.0, float(bbox[1]))
            x1, y1 = min(float(w), float(bbox[0] + bbox[2])), min(float(h), float(bbox[1] + bbox[3]))
            has_box = x1 - x0 >= 1 and y1 - y0 >= 1
        if has_box and not self.recipe.train and self.recipe.crop_to_bbox:
            m = self.recipe.bbox_margin
            mx, my = m * (x1 - x0), m * (y1 - y0)
            xa, ya = int(max(0, x0 - mx)), int(max(0, y0 - my))
            xb, yb = int(min(w, math.ceil(x1 + mx))), int(min(h, math.ceil(y1 + my)))
            pixels = pixels[ya:yb, xa:xb].copy()  # C-contiguous for albumentations
        if has_box and self._boxed is not None:
            out = self._boxed(image=pixels, bboxes=[(x0, y0, x1 - x0, y1 - y0)], bbox_labels=[0])
        else:
            out = self._plain(image=pixels)
        return out["image"]


def build_view(recipe: ViewRecipe, seed: int | None = None) -> View:
    """Build the callable view for a recipe (see `View`)."""
    return View(recipe, seed=seed)
