"""Name the species in photos with a model from `finegrain export`, using numpy, Pillow and onnxruntime only.

    python predict.py EXPORT_DIR PHOTO_OR_FOLDER... [-o preds.csv] [--top-k 5] [--open-set on|off]
    python -m finegrain.runtime EXPORT_DIR PHOTO_OR_FOLDER... [-o preds.csv]

This file is self-contained: `finegrain export` copies it into the export folder as predict.py, so a device
needs no torch and no finegrain. The model (EXPORT_DIR/model.onnx) takes decoded photos as they are, a
(B, H, W, 3) uint8 RGB batch of one size, and does the rest itself: resize, centre crop, normalise, the
backbone (flip-averaged if the classifier was fitted so), the classifier and the open-set score with its
threshold. Decoding (EXIF orientation, transparency on white) is done here, as `finegrain predict` does it.

Writes the columns of `finegrain predict`: path, pred_1..pred_K, score_1..score_K (probabilities), with
open-set scoring nearest_species, unknown_score, known (pred_1 is 'unknown' when not known), and error.
A photo that does not decode gets a warning naming it and an error row without predictions.
Exit code 2 with one line for a missing or damaged model, a photo path that does not exist, or no photos.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MODEL_FILE = "model.onnx"
UNKNOWN = "unknown"  # pred_1 of a photo whose open-set score is past the threshold
MAX_PIXELS = 89_478_485  # Pillow's default: larger files are refused as possible decompression bombs
MIN_SIDE = 8  # smaller images are broken downloads or placeholders


class RunnerError(Exception):
    """A problem with the user's input (model file, photo paths): one line, exit code 2."""


@dataclass
class ExportedModel:
    """An onnxruntime session of an exported model and what its metadata says.

    Attributes: classes (C,) species names; open_set: whether the model scores unknown species;
    meta: the model's metadata (strings; see `finegrain export`).
    """

    session: object
    classes: list[str]
    open_set: bool
    meta: dict

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """(B, H, W, 3) uint8 RGB -> {"probabilities": (B, C), "embedding": (B, D)} and, with open-set scoring,
        "unknown_score" and "known" (B,)."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {"image": pixels})))


def load_model(path, *, threads: int | None = None, providers=None) -> ExportedModel:
    """Open EXPORT_DIR (or its model.onnx). Raises RunnerError: missing, damaged, or not a finegrain export."""
    import onnxruntime as ort

    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise RunnerError(f"{file}: no such model file (give the folder `finegrain export` wrote, or its {MODEL_FILE})")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(file), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for every kind of damage
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunnerError(f"{file}: not a readable ONNX model (damaged or incomplete? {reason[:200]})") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if "class_names" not in meta or [i.name for i in session.get_inputs()] != ["image"]:
        raise RunnerError(f"{file}: not a model from `finegrain export` (no class names in its metadata)")
    return ExportedModel(session, json.loads(meta["class_names"]), meta.get("open_set_score", "") != "", meta)


def decode(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file, EXIF orientation applied, transparency composited on white.

    Raises ValueError with the reason when the file does not decode or is too small or too large.
    """
    data = path.read_bytes()
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ValueError("not an image file (unknown format)") from None
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS or min(w, h) < MIN_SIDE:
                raise ValueError(f"{w}x{h} pixels is outside {MIN_SIDE} px per side to {MAX_PIXELS:,} pixels")
            img.load()
            return np.ascontiguousarray(_to_rgb(ImageOps.exif_transpose(img)))


def _to_rgb(img: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode -> (H, W, 3) uint8 RGB (16-bit and float modes scaled to 8 bits)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr, top = arr - lo, max(hi - lo, 1e-12)
        else:
            top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        gray = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def collect_photos(inputs) -> list[Path]:
    """Image files named by `inputs` (files, or folders searched recursively, hidden ones left out), absolute."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
        elif item.is_file():
            found.append(item)
        else:
            raise RunnerError(f"no such file or folder: {item}")
    if not found:
        raise RunnerError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(map(str, inputs))}")
    return [p.resolve() for p in found]


def columns(top_k: int, open_set: bool) -> list[str]:
    """The CSV columns, as `finegrain predict` writes them."""
    cols = ["path"] + [f"pred_{j + 1}" for j in range(top_k)] + [f"score_{j + 1}" for j in range(top_k)]
    return cols + (["nearest_species", "unknown_score", "known"] if open_set else []) + ["error"]


def predict(model: ExportedModel, photos, *, top_k: int = 5, open_set: bool | None = None, batch_size: int = 32,
            warn=None) -> tuple[list[dict], list[str]]:
    """One row per photo (in order) and the columns; photos of one size run as one batch of at most `batch_size`.

    open_set: None scores unknown species when the model can, True insists, False leaves it out.
    warn: called with a message for each photo that does not decode (default: print to stderr).
    """
    if open_set and not model.open_set:
        raise RunnerError("--open-set on: this model stores no unknown-species calibration; use --open-set off")
    open_set = model.open_set if open_set is None else open_set
    top_k = max(1, min(top_k, len(model.classes)))
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    rows: list[dict] = []
    batch: list[tuple[int, np.ndarray]] = []
    for path in photos:
        try:
            pixels = decode(Path(path))
        except Exception as e:  # noqa: BLE001 - whatever a decoder raises, the photo is bad, not the run
            warn(f"skipping {path}: {e}")
            rows.append({"path": str(path), "error": str(e) or type(e).__name__})
            continue
        if batch and (len(batch) == batch_size or batch[0][1].shape != pixels.shape):
            _run_batch(model, batch, rows, top_k, open_set)
            batch = []
        rows.append({"path": str(path)})
        batch.append((len(rows) - 1, pixels))
    if batch:
        _run_batch(model, batch, rows, top_k, open_set)
    return rows, columns(top_k, open_set)


def _run_batch(model: ExportedModel, batch, rows: list[dict], top_k: int, open_set: bool) -> None:
    """Fill rows[i] for each (i, pixels) of a batch of same-size photos."""
    out = model.run(np.stack([pixels for _, pixels in batch]))
    probs = out["probabilities"].astype(np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    for b, (i, _) in enumerate(batch):
        row = rows[i]
        row.update({f"pred_{j + 1}": model.classes[c] for j, c in enumerate(order[b])})
        row.update({f"score_{j + 1}": round(float(probs[b, c]), 6) for j, c in enumerate(order[b])})
        row["error"] = ""
        if open_set:
            known = bool(out["known"][b])
            row.update(nearest_species=row["pred_1"], unknown_score=round(float(out["unknown_score"][b]), 6),
                       known=known)
            row["pred_1"] = row["pred_1"] if known else UNKNOWN


def write_csv(rows: list[dict], cols: list[str], out) -> None:
    """Rows as CSV to `out` (a path, or a text stream); missing values are empty."""
    if hasattr(out, "write"):
        writer = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        write_csv(rows, cols, f)
    tmp.replace(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Name the species in photos with a model from `finegrain export` "
                                "(numpy, Pillow and onnxruntime only).",
                                epilog="Example: python predict.py export/ ~/feeder/today -o today.csv")
    p.add_argument("model", metavar="EXPORT_DIR", help="The folder `finegrain export` wrote, or its model.onnx.")
    p.add_argument("photos", metavar="PHOTO_OR_FOLDER", nargs="+", help="Photos, or folders searched recursively.")
    p.add_argument("-o", "--out", help="CSV to write (default: CSV on standard output).")
    p.add_argument("--top-k", type=int, default=5, help="Species to list per photo (default 5).")
    p.add_argument("--open-set", choices=("on", "off"), default=None,
                   help="Name photos unlike every trained species 'unknown' (default: on when the model can).")
    p.add_argument("--batch-size", type=int, default=32, help="Photos of one size run together (default 32).")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores).")
    return p


def main(argv=None) -> int:
    """The command line; returns the exit code (0, or 2 with one line on standard error)."""
    args = _parser().parse_args(argv)
    try:
        if args.top_k < 1 or args.batch_size < 1:
            raise RunnerError("--top-k and --batch-size must be at least 1")
        model = load_model(args.model, threads=args.threads)
        photos = collect_photos(args.photos)
        open_set = None if args.open_set is None else args.open_set == "on"
        rows, cols = predict(model, photos, top_k=args.top_k, open_set=open_set, batch_size=args.batch_size)
        if all(r.get("error") for r in rows):
            raise RunnerError(f"none of the {len(rows)} photos could be read")
        write_csv(rows, cols, args.out or sys.stdout)
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        print(f"wrote {args.out}: {len(rows)} photos", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
