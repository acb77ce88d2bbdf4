"""ManifestDataset over real files: views, labels, bad images, bounding boxes, decoded-image cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import finegrain.data.images as images_module
from finegrain.data.cache import DecodedImageCache
from finegrain.data.dataset import ManifestDataset
from finegrain.data.images import decode_image
from finegrain.data.importers import import_cub
from finegrain.data.views import build_view, make_recipe
from finegrain.errors import BadImageError, FinegrainError


def test_two_views_label_and_index_through_a_dataloader(birds):
    ds = ManifestDataset(birds, build_view(make_recipe("simclr", image_size=40)), n_views=2)
    views, labels, index = next(iter(DataLoader(ds, batch_size=8, shuffle=True, num_workers=2)))
    assert len(views) == 2 and all(v.shape == (8, 3, 40, 40) for v in views)
    assert not torch.equal(views[0], views[1])
    for lab, i in zip(labels.tolist(), index.tolist()):
        assert ds.class_names[lab] == birds.table["label"][i]


def test_asymmetric_views_and_unlabeled_rows(birds):
    t = birds.table.copy()
    t.loc[0, ["label", "split"]] = ["", "unlabeled"]
    from finegrain.data.manifest import Manifest

    m = Manifest.from_table(t, birds.root)
    ds = ManifestDataset(m, [build_view(make_recipe("eval", image_size=24)), build_view(make_recipe("simclr", image_size=32))], class_names=birds.class_names)
    views, label, index = ds[0]
    assert [v.shape[-1] for v in views] == [24, 32] and label == -1 and index == 0
    with pytest.raises(FinegrainError, match="not among the model's classes"):
        ManifestDataset(m, views=build_view(make_recipe("eval", image_size=24)), class_names=birds.class_names[:2])


def test_bad_image_error_or_skip(birds):
    bad = birds.table["path"][3]
    (birds.root / bad).write_text("not an image")
    view = build_view(make_recipe("eval", image_size=24))
    with pytest.raises(BadImageError) as info:
        ManifestDataset(birds, view)[3]
    assert info.value.path == bad
    ds = ManifestDataset(birds, view, on_bad_image="skip")
    served = [ds[i][2] for i in range(len(ds))]  # a whole epoch, no exception
    assert served[3] == 4 and 3 not in served


def test_bbox_follows_reduced_decoding(birds, tmp_path):
    """A box in original pixels still frames the same region when the image is decoded smaller."""
    from PIL import Image

    from finegrain.data.manifest import Manifest

    img = np.zeros((400, 600, 3), np.uint8)
    img[300:360, 480:560] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "big.jpg", quality=95)
    t = birds.table.iloc[:1].copy()
    t["path"] = "big.jpg"
    t["bbox_x"], t["bbox_y"], t["bbox_w"], t["bbox_h"] = 480.0, 300.0, 80.0, 60.0
    m = Manifest.from_table(t, tmp_path)
    view = build_view(make_recipe("eval", image_size=32, crop_to_bbox=True, bbox_margin=0.0, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1)))
    ds = ManifestDataset(m, view, decode_min_side=100)
    assert ds.load(0).pixels.shape[0] < 400
    out = ds[0][0][0]
    assert out[0].mean() > 0.9 and out[1].mean() < 0.1


def test_cache_matches_decoding_and_is_reused(birds, tmp_path, monkeypatch):
    cache = DecodedImageCache.open_or_build(birds, tmp_path / "cache", shorter_side=40, progress=False)
    assert len(cache) == len(birds)
    for i in (0, 5, len(birds) - 1):
        got = cache.get(i)
        ref = decode_image(birds.root / birds.table["path"][i]).pixels
        assert got.pixels.shape == (40, 40, 3) and got.original_size == (64, 64)
        import cv2

        assert np.abs(got.pixels.astype(int) - cv2.resize(ref, (40, 40), interpolation=cv2.INTER_AREA).astype(int)).max() <= 1
    stamp = cache.data_path.stat().st_mtime_ns
    again = DecodedImageCache.open_or_build(birds, tmp_path / "cache", shorter_side=40, progress=False)
    assert again.data_path == cache.data_path and again.data_path.stat().st_mtime_ns == stamp

    # With the cache, no file is decoded again, also inside DataLoader worker processes.
    def no_decoding(*a, **k):
        raise AssertionError("decoded a file despite the cache")

    monkeypatch.setattr(images_module, "decode_image", no_decoding)  # Manifest.decode reads it from there
    ds = ManifestDataset(birds, build_view(make_recipe("simclr", image_size=32)), n_views=2, cache=again)
    n = sum(len(b[1]) for b in DataLoader(ds, batch_size=8, num_workers=2))
    assert n == len(birds)


def test_cache_key_changes_with_files_and_bad_files_are_recorded(birds, tmp_path):
    a = DecodedImageCache.open_or_build(birds, tmp_path, shorter_side=32, progress=False)
    (birds.root / birds.table["path"][2]).write_bytes(b"")
    with pytest.raises(BadImageError):
        DecodedImageCache.open_or_build(birds, tmp_path, shorter_side=32, progress=False)
    b = DecodedImageCache.open_or_build(birds, tmp_path, shorter_side=32, on_bad_image="skip", progress=False)
    assert b.data_path != a.data_path
    with pytest.raises(BadImageError, match="empty"):
        b.get(2)
    ds = ManifestDataset(birds, build_view(make_recipe("eval", image_size=24)), cache=b, on_bad_image="skip")
    assert ds[2][2] == 3


def test_cache_on_real_birds(cub50, tmp_path):
    m = import_cub(cub50).select("train")
    m.table = m.table.iloc[:40].reset_index(drop=True)
    cache = DecodedImageCache.open_or_build(m, tmp_path, shorter_side=96, progress=False)
    for i in range(len(m)):
        px = cache.get(i).pixels
        assert min(px.shape[:2]) == 96
        assert px.std() > 10  # real photo content, not blank
    ds = ManifestDataset(m, build_view(make_recipe("simclr", image_size=64)), n_views=2, cache=cache)
    views, label, _ = ds[0]
    assert views[0].shape == (3, 64, 64) and label >= 0


def test_seeded_views_do_not_depend_on_workers_or_order(birds):
    def epoch_views(workers, shuffle_seed):
        ds = ManifestDataset(birds, build_view(make_recipe("simclr", image_size=32)), n_views=2, seed=11)
        ds.set_epoch(1)
        g = torch.Generator().manual_seed(shuffle_seed)
        out = {}
        for views, _, index in DataLoader(ds, batch_size=5, shuffle=True, generator=g, num_workers=workers):
            for j, i in enumerate(index.tolist()):
                out[i] = torch.stack([views[0][j], views[1][j]])
        return out

    a, b = epoch_views(0, 1), epoch_views(2, 2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[i], b[i]) for i in a)
    assert not torch.equal(a[0][0], a[0][1])  # the two views still differ
    ds = ManifestDataset(birds, build_view(make_recipe("simclr", image_size=32)), seed=11)
    ds.set_epoch(2)
    assert not torch.equal(ds[0][0][0], a[0][0])  # a new epoch draws new views


def test_an_index_past_the_end_serves_the_row_again_with_other_augmentations(birds):
    ds = ManifestDataset(birds, build_view(make_recipe("simclr", image_size=32)), n_views=2, seed=11)
    views, label, index = ds[3]
    again, label_again, index_again = ds[3 + len(ds)]
    assert (label_again, index_again) == (label, index) == (label, 3)
    assert not torch.equal(views[0], again[0])
    assert all(torch.equal(a, b) for a, b in zip(ds[3 + len(ds)][0], again))  # still a function of the index
