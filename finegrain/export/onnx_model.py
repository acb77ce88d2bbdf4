"""An artifact's predict path as one ONNX model: preprocessing (preprocess.py) then the network (network.py).

The network is exported with torch's dynamo exporter (torch.onnx.export, opset 18, weights inside the file)
for a dynamic batch at the classifier's fixed image size; the hand-built preprocessing graph is put in front
with onnx.compose, so the model takes a decoded photo batch (B, H, W, 3) uint8 of any H and W.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

import finegrain
from finegrain.artifacts import Artifact
from finegrain.errors import FinegrainError
from finegrain.export.network import OUTPUTS, ExportNet
from finegrain.export.preprocess import INPUT, OUTPUT, preprocess_graph

log = logging.getLogger("finegrain")

OPSET = 18


@dataclass(frozen=True)
class Reading:
    """How photos are read: image side S, shorter side R before the centre crop, normalisation, flip averaging."""

    image_size: int
    resize: int
    mean: tuple
    std: tuple
    flip: bool


def reading_of(artifact: Artifact) -> Reading:
    """The reading `finegrain predict` uses for this artifact (stages/predict.py `reading`)."""
    from finegrain.stages.predict import reading

    recipe, flip = reading(artifact.info)
    return Reading(recipe.image_size, int(round(recipe.image_size / recipe.crop_pct)), tuple(recipe.mean),
                   tuple(recipe.std), flip)


def classifier_of(artifact: Artifact) -> dict[str, torch.Tensor]:
    """The artifact's stored classifier {"weight": (C, D), "bias": (C,)}.

    Raises:
        FinegrainError: the artifact holds none (a pretrain run, or supcon --no-classifier).
    """
    head = artifact.state_dict("classifier.")
    if not head or not artifact.info.get("class_names"):
        raise FinegrainError(f"{artifact.path} has no classifier ({artifact.info.get('stage')} artifact); export needs "
                             "a supcon artifact (one trained without --no-classifier)")
    return head


def build_network(artifact: Artifact) -> ExportNet:
    """The artifact's backbone, stored classifier and open-set reference as one module in eval mode (raises as
    `classifier_of`)."""
    from finegrain.models.backbone import create_backbone
    from finegrain.stages.predict import open_set_reference

    info = artifact.info
    head = classifier_of(artifact)
    backbone = create_backbone(info["backbone"], weights=artifact.path)
    return ExportNet(backbone, head["weight"], head["bias"], flip=reading_of(artifact).flip,
                     reference=open_set_reference(artifact, None)).eval()


def export_network(net: ExportNet, image_size: int, path: Path) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of `net` for input (B, 3, S, S) float32 "pixels", B dynamic; the loaded model."""
    example = torch.randn(2, 3, image_size, image_size)  # a batch of 2: a size-1 dim would be fixed
    names = list(OUTPUTS if net.scorer is not None else OUTPUTS[:2])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(net, (example,), str(path), input_names=[OUTPUT], output_names=names,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          opset_version=OPSET, external_data=False, dynamo=True, verbose=False)
    return onnx.load(str(path))


@dataclass
class Parts:
    """An artifact's model in two ONNX parts: preprocessing (INPUT -> OUTPUT) and the network (OUTPUT -> OUTPUTS),
    with the metadata of the whole (see `metadata`)."""

    preprocess: onnx.ModelProto
    network: onnx.ModelProto
    metadata: dict[str, str]


def export_parts(artifact: Artifact) -> Parts:
    """The preprocessing graph and the exported network of an artifact, and its metadata."""
    reading = reading_of(artifact)
    net = build_network(artifact)
    with tempfile.TemporaryDirectory() as tmp:
        network = export_network(net, reading.image_size, Path(tmp) / "network.onnx")
    opset = next(o.version for o in network.opset_import if o.domain in ("", "ai.onnx"))
    prep = preprocess_graph(image_size=reading.image_size, resize=reading.resize, mean=reading.mean, std=reading.std,
                            opset=opset, ir_version=network.ir_version)
    return Parts(prep, network, metadata(artifact, reading, net))


def compose(parts: Parts, network: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The whole model: INPUT (B, H, W, 3) uint8 -> probabilities, embedding[, unknown_score, known], with metadata.

    network: another network part to put behind the preprocessing (the int8 one); default parts.network."""
    network = network or parts.network
    prep = parts.preprocess
    if network.ir_version != prep.ir_version:  # the quantizer may write another IR version
        prep = onnx.ModelProto.FromString(prep.SerializeToString())
        prep.ir_version = network.ir_version
    extra = [o for o in network.opset_import if o.domain not in ("", "ai.onnx")]
    if extra:
        prep = onnx.ModelProto.FromString(prep.SerializeToString())
        prep.opset_import.extend(extra)
    model = onnx.compose.merge_models(prep, network, io_map=[(OUTPUT, OUTPUT)])
    model.graph.name = "finegrain_" + parts.metadata["backbone"]
    set_metadata(model, parts.metadata)
    onnx.checker.check_model(model)
    return model


def build_onnx(artifact: Artifact) -> onnx.ModelProto:
    """The whole fp32 model of an artifact (`compose` of `export_parts`)."""
    return compose(export_parts(artifact))


def metadata(artifact: Artifact, reading: Reading, net: ExportNet) -> dict[str, str]:
    """What the runner and a person need, as strings: classes, image size, reading, threshold, versions, hashes."""
    info = artifact.info
    stored = info.get("open_set") or {}
    scored = net.scorer is not None
    return {
        "class_names": json.dumps(info["class_names"]),
        "image_size": str(reading.image_size), "resize_shorter_side": str(reading.resize),
        "mean": json.dumps(list(reading.mean)), "std": json.dumps(list(reading.std)), "flip_tta": str(reading.flip),
        "input": f"{INPUT}: (B, H, W, 3) uint8 RGB, decoded, EXIF orientation applied; one size per batch",
        "open_set_score": stored.get("score", "") if scored else "",
        "threshold": repr(float(stored["threshold"])) if scored else "",
        "backbone": info["backbone"], "embedding_dim": str(info.get("embedding_dim", "")),
        "stage": info["stage"], "method": str(info.get("method", "")),
        "artifact_hash": artifact.hash, "artifact_path": str(artifact.path.resolve()),
        "finegrain_version": finegrain.__version__, "torch_version": torch.__version__,
    }


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace the model's metadata_props with `props` (what onnxruntime's custom_metadata_map reads)."""
    onnx.helper.set_model_props(model, props)
    model.producer_name, model.producer_version = "finegrain", finegrain.__version__
