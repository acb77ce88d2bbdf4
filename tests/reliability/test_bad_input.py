"""Bad images and bad manifests through the command line: each is named with its reason, nothing ends
in a traceback, and training never dies in the middle of an epoch because of one file."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from finegrain.artifacts import load_artifact
from finegrain.cli import app
from finegrain.config import PretrainConfig
from finegrain.data.images import DEFAULT_MAX_PIXELS
from finegrain.data import validate
from finegrain.stages.pretrain import run_pretrain

TRAIN = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--epochs", "1", "--workers", "0", "--wandb", "disabled", "--no-knn-monitor"]


def _photo(seed: int, size=(80, 60)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8))


def _bomb_png(path, side: int) -> None:
    """A real 10x10 PNG whose header claims side x side pixels: refused before any pixel is decoded."""
    Image.new("L", (10, 10)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", side, side)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))


def _write_odd_files(folder) -> tuple[dict[str, str], list[str]]:
    """Broken files (name -> the reason validation must give) and odd-but-valid ones, all in `folder`."""
    folder.mkdir()
    (folder / "zero.jpg").write_bytes(b"")
    _photo(1).save(folder / "whole.jpg")
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "text.jpg").write_text("a list of birds, not a picture of one\n")
    Image.new("RGB", (1, 1)).save(folder / "pixel.png")
    _bomb_png(folder / "bomb.png", int(DEFAULT_MAX_PIXELS ** 0.5) + 100)
    broken = {"zero.jpg": "empty file", "truncated.jpg": "truncated", "text.jpg": "not an image",
              "pixel.png": "1x1", "bomb.png": "decompression bomb"}

    _photo(2).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.random.default_rng(3).integers(0, 65535, (60, 80))).astype(np.uint16)).save(folder / "deep.png")
    rgba = _photo(4).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _photo(5).save(folder / "rotated.jpg", exif=exif.tobytes())
    return broken, ["cmyk.jpg", "deep.png", "rgba.png", "rotated.jpg"]


@pytest.fixture
def odd_manifest(birds):
    """The synthetic birds plus every kind of broken and odd image as train rows; (path, broken, odd)."""
    broken, odd = _write_odd_files(birds.root / "odd")
    label = birds.table["label"][0]
    extra = pd.DataFrame([{"image_id": f"odd{i}", "path": f"odd/{name}", "label": label, "split": "train"}
                          for i, name in enumerate([*broken, *odd])])
    path = birds.root / "odd.csv"
    pd.concat([birds.table, extra], ignore_index=True).to_csv(path, index=False)
    return path, broken, odd


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_validate_names_each_broken_image_and_accepts_the_odd_ones(odd_manifest):
    path, broken, odd = odd_manifest
    r = CliRunner().invoke(app, ["manifest", "validate", str(path)])
    _no_traceback(r)
    assert r.exit_code != 0
    text = " ".join(r.output.split())  # rich wraps long lines
    for name, reason in broken.items():
        assert f"odd/{name}" in text and reason in text, (name, reason, r.output)
    for name in odd:
        assert f"odd/{name}" not in text, (name, r.output)


def test_training_stops_before_it_starts_or_skips_the_bad_files(odd_manifest, tmp_path):
    path, broken, odd = odd_manifest
    args = ["pretrain", "--manifest", str(path), "--cache-dir", str(tmp_path / "cache"), *TRAIN]
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "strict")])  # --on-bad-image error is the default
    _no_traceback(r)
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert all(f"odd/{name}" in text for name in broken), r.output
    assert not (tmp_path / "strict" / "checkpoint.pt").exists()
    assert not (tmp_path / "strict" / "metrics.jsonl").exists(), "training must not have started"

    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "lenient"), "--on-bad-image", "skip"])
    _no_traceback(r)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert all(f"odd/{name}" in text for name in broken), "each skipped file is named"
    art = load_artifact(tmp_path / "lenient")
    assert art.info["stage"] == "pretrain"


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_file_that_breaks_mid_training_does_not_kill_the_epoch(birds, tmp_path, monkeypatch, caplog, policy):
    """Validation passes, then a file is truncated on disk before the epoch reads it (no image cache)."""
    victim = birds.root / birds.select("train").table["path"][3]
    checked = validate.check_manifest_or_raise

    def check_then_break(*args, **kwargs):
        result = checked(*args, **kwargs)
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 3])
        return result

    monkeypatch.setattr(validate, "check_manifest_or_raise", check_then_break)
    cfg = PretrainConfig(manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "run"), backbone="test_efficientnet",
                         weights="none", image_size=32, batch_size=8, epochs=2, workers=0, wandb="disabled",
                         cache_images=False, knn_monitor=False, on_bad_image=policy)
    art = run_pretrain(cfg)
    assert art.info["metrics"]["steps"] == 2 * (24 // 8)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and victim.name in r.getMessage()]
    assert len(warned) == 1 and "truncated" in warned[0], "named once, with its reason"


# One case per manifest problem: (how to break the table or the files, words the error must contain).
BAD_MANIFESTS = {
    "missing column": (lambda t, root: t.drop(columns=["label"]), "missing column"),
    "unknown split": (lambda t, root: t.assign(split=t["split"].replace("test", "testing")), "unknown split"),
    "empty class name": (lambda t, root: t.assign(label=t["label"].where(t.index != 0, "")), "no label"),
    "path escapes root": (lambda t, root: t.assign(path=t["path"].where(t.index != 0, "../../etc/passwd")),
                          "leaves the dataset root"),
    "absolute path outside": (lambda t, root: t.assign(path=t["path"].where(t.index != 0, "/etc/hostname")),
                              "leaves the dataset root"),
    "duplicated row": (lambda t, root: pd.concat([t, t.iloc[[0]]], ignore_index=True), "duplicated"),
    "no rows": (lambda t, root: t.iloc[0:0], "no rows"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_one_clear_error(birds, tmp_path, case):
    mutate, words = BAD_MANIFESTS[case]
    path = birds.root / "bad.csv"
    mutate(birds.table.copy(), birds.root).to_csv(path, index=False)
    for command in (["manifest", "validate", str(path)],
                    ["pretrain", "--manifest", str(path), "-o", str(tmp_path / "out"), *TRAIN]):
        r = CliRunner().invoke(app, command)
        _no_traceback(r)
        # `manifest validate` exits 1 when it found problems, 2 when it cannot read the manifest at all.
        assert r.exit_code in ((1, 2) if command[0] == "manifest" else (2,)), (command[0], r.output)
        assert words in " ".join(r.output.split()), (command[0], r.output)
        assert not (tmp_path / "out" / "metrics.jsonl").exists()
