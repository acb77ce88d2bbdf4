"""Albumentations view recipes: shapes, randomness, seeding and bounding-box-safe crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finegrain.data.views import IMAGENET_MEAN, IMAGENET_STD, build_view, make_recipe
from finegrain.errors import FinegrainError


def _photo(h=90, w=120, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["simclr", "supcon", "eval"])
def test_recipes_make_normalised_tensors(name):
    view = build_view(make_recipe(name, image_size=48))
    out = view(_photo())
    assert isinstance(out, torch.Tensor) and out.shape == (3, 48, 48) and out.dtype == torch.float32
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert out.min() >= lo.min() - 1e-4 and out.max() <= hi.max() + 1e-4


def test_eval_is_deterministic_train_is_random():
    img = _photo()
    ev = build_view(make_recipe("eval", image_size=32))
    assert torch.equal(ev(img), ev(img))
    tr = build_view(make_recipe("simclr", image_size=32))
    assert not torch.equal(tr(img), tr(img))


def test_seeded_views_repeat():
    img = _photo()
    a = build_view(make_recipe("simclr", image_size=32), seed=7)
    b = build_view(make_recipe("simclr", image_size=32), seed=7)
    for _ in range(3):
        assert torch.equal(a(img), b(img))


def test_supcon_keeps_colour():
    """The supcon recipe never changes colour: a pure-red image stays pure red."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0] = 200
    view = build_view(make_recipe("supcon", image_size=32, mean=(0, 0, 0), std=(1, 1, 1)))
    for _ in range(10):
        out = view(img)
        assert torch.allclose(out[0], torch.full((32, 32), 200 / 255), atol=1e-3) and out[1:].abs().max() < 1e-3


def _red_visible(t):
    # Undo a (0, 0, 0) / (1, 1, 1) normalisation: channels are [0, 1].
    return bool(((t[0] > 0.6) & (t[1] < 0.3) & (t[2] < 0.3)).any())


def test_bbox_safe_crop_keeps_the_bird_in_view():
    img = np.zeros((200, 200, 3), np.uint8)
    img[150:170, 150:170] = (255, 0, 0)  # the "bird"
    box = np.array([150.0, 150.0, 20.0, 20.0])
    kw = dict(image_size=32, crop_scale=(0.08, 0.1), color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    safe = build_view(make_recipe("simclr", **kw), seed=0)
    plain = build_view(make_recipe("simclr", bbox_safe=False, **kw), seed=0)
    assert all(_red_visible(safe(img, box)) for _ in range(30))
    assert not all(_red_visible(plain(img, box)) for _ in range(30))


def test_eval_crop_to_bbox():
    img = np.zeros((200, 200, 3), np.uint8)
    img[20:60, 120:180] = (255, 0, 0)
    box = np.array([120.0, 20.0, 60.0, 40.0])
    kw = dict(image_size=32, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0)
    cropped = build_view(make_recipe("eval", crop_to_bbox=True, bbox_margin=0.0, **kw))(img, box)
    whole = build_view(make_recipe("eval", **kw))(img, box)
    assert cropped[0].mean() > 0.95 and whole[0].mean() < 0.2


def test_bad_recipe_names_and_fields():
    with pytest.raises(FinegrainError, match="unknown view recipe"):
        make_recipe("byol-ish")
    with pytest.raises(FinegrainError, match="unknown view option"):
        make_recipe("simclr", jitter=0.3)
    assert make_recipe("simclr", crop_scale=[0.2, 1.0]).crop_scale == (0.2, 1.0)
