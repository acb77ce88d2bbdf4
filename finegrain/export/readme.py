"""The README.md of an export folder: what is in it, how to install and run it, what the model takes and gives."""

from __future__ import annotations

import json

TEMPLATE = """# {title}

Exported by finegrain {version} from `{artifact}` (artifact hash `{hash}`), {created}.
{classes} species; backbone {backbone}.

## Run it (no torch needed)

    python -m venv .venv && . .venv/bin/activate
    pip install -r requirements.txt          # numpy, Pillow, onnxruntime
    python predict.py . PHOTO_OR_FOLDER... -o predictions.csv

Options: `--top-k 5`, `--open-set on|off`, `--batch-size 32`, `--threads N`; `python predict.py --help`.
With finegrain installed, `python -m finegrain.runtime . PHOTOS...` and
`finegrain predict --model model.onnx PHOTOS...` run the same model.

predictions.csv has the columns of `finegrain predict`: path, pred_1..pred_K, score_1..score_K
(probabilities){open_set_columns}, and error (a photo that does not decode: a warning naming it and a row
without predictions).

## The model

`model.onnx` takes `image`: a (B, H, W, 3) uint8 RGB batch of decoded photos of one size (EXIF orientation
applied; predict.py decodes files with Pillow). Inside the graph: the shorter side resized to {resize} px
(OpenCV's bilinear arithmetic, as `finegrain predict` reads photos), a centre {size} x {size} crop,
normalisation (mean {mean}, std {std}), the backbone{flip}, L2 normalisation, the stored classifier
(softmax), and {open_set}.

Outputs: `probabilities` (B, {classes}) in the order of the metadata's `class_names`; `embedding` (B, {dim})
L2-normalised features{open_set_outputs}. The metadata (`onnxruntime` `get_modelmeta().custom_metadata_map`)
holds class_names (JSON), image_size, threshold, finegrain_version and artifact_hash.
{int8}
## Files

{files}
"""


def readme(record: dict) -> str:
    """README.md text for an export record (export.json's content, before it is written)."""
    meta = record["metadata"]
    classes = json.loads(meta["class_names"])
    scored = bool(meta["open_set_score"])
    sizes = "\n".join(f"- `{name}`: {f['bytes'] / 1e6:.1f} MB, sha256 {f['sha256'][:16]}..."
                      for name, f in record["files"].items())
    return TEMPLATE.format(
        title=f"{meta['backbone']} bird model ({len(classes)} species), exported to ONNX",
        version=record["finegrain_version"], artifact=record["parent"]["path"], hash=meta["artifact_hash"],
        created=record["created"], classes=len(classes), backbone=meta["backbone"], resize=meta["resize_shorter_side"],
        size=meta["image_size"], mean=meta["mean"], std=meta["std"], dim=meta["embedding_dim"],
        flip=" (each photo's features averaged with its mirror image's)" if meta["flip_tta"] == "True" else "",
        open_set=(f"the open-set score ({meta['open_set_score']}; larger = less like any trained species) against "
                  f"its calibrated threshold {float(meta['threshold']):.6g}") if scored else "no open-set score "
                 "(the artifact stores no calibration)",
        open_set_columns=(", nearest_species, unknown_score and known (pred_1 is `unknown` when the photo is "
                          "unlike every trained species)") if scored else "",
        open_set_outputs="; `unknown_score` (B,) and `known` (B,) bool (unknown_score <= threshold)" if scored else "",
        int8=_int8(record.get("int8")),
        files=sizes + "\n- `requirements.txt`, `README.md`, `export.json` (what was exported from what)")


def _int8(check: dict | None) -> str:
    """The int8 paragraph: where it came from and how it compared with fp32."""
    if not check:
        return ""
    acc = ""
    if check.get("fp32_top1") is not None:
        acc = f"; top-1 accuracy {100 * check['int8_top1']:.1f}% (fp32 {100 * check['fp32_top1']:.1f}%)"
    return (f"\n`model.int8.onnx`: the same with int8 convolutions (onnxruntime static quantization, calibrated on "
            f"{check['calibration_photos']} train photos at most), {check['size_ratio']:.2f} of the fp32 file's size. "
            f"On {check['photos']} {check['split']} photos its top-1 agreed with fp32's on "
            f"{100 * check['top1_agreement']:.1f}%{acc}. Run it with `python predict.py model.int8.onnx PHOTOS...`.\n")
