"""int8 models: onnxruntime static quantization of the network's convolutions, calibrated on train photos.

The documented path for CNNs (onnxruntime.quantization): `quant_pre_process` (shape inference, BatchNorm and
other folds), then `quantize_static` in QDQ format with MinMax calibration, uint8 activations and int8
weights. Only Conv nodes are quantized: the classifier, the L2 norm and the open-set score (float64) stay
in floating point, so int8 changes the features and nothing after them. Calibration photos go through the
fp32 preprocessing graph, so they are read exactly as predict reads photos.
"""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path

import numpy as np
import onnx

from finegrain.errors import BadImageError, FinegrainError
from finegrain.export.preprocess import INPUT, OUTPUT

log = logging.getLogger("finegrain")


def manifest_photos(manifest_path, count: int, seed: int = 0, split: str = "train"):
    """Yield (label, (H, W, 3) uint8 pixels) of up to `count` photos of the manifest's `split`, drawn at random
    (`seed`); a photo that does not decode is left out with a warning. Files and shard folders alike.

    Raises:
        FinegrainError: the manifest cannot be read or has no photos in `split`.
    """
    from finegrain.data.manifest import Manifest

    manifest = Manifest.load(manifest_path).rows(split)
    if len(manifest) == 0:
        raise FinegrainError(f"--calibration-manifest: {manifest_path} has no {split} photos to calibrate int8 with")
    order = list(range(len(manifest)))
    random.Random(seed).shuffle(order)
    labels = manifest.table["label"].tolist()
    for i in order[:count]:
        try:
            yield labels[i], manifest.decode(i).pixels
        except BadImageError as e:
            log.warning("int8 calibration: skipping %s", e)


def preprocessed(prep: onnx.ModelProto, photos, *, batch_size: int = 16):
    """Yield (B, 3, S, S) float32 batches of `photos` ((H, W, 3) uint8 each) read by the preprocessing graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(prep.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = []
    for pixels in photos:
        batch.append(session.run(None, {INPUT: pixels[None]})[0])
        if len(batch) == batch_size:
            yield np.concatenate(batch)
            batch = []
    if batch:
        yield np.concatenate(batch)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over preprocessed batches."""

    def __init__(self, batches):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {OUTPUT: batch}


def quantize_network(network: onnx.ModelProto, prep: onnx.ModelProto, photos, *, per_channel: bool = False
                     ) -> onnx.ModelProto:
    """The network part with int8 convolutions (QDQ), calibrated on `photos` ((H, W, 3) uint8 each) read through
    `prep`. per_channel: one scale per output channel (then with reduce_range, for CPUs without VNNI)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        fp32, ready, int8 = (Path(tmp) / name for name in ("fp32.onnx", "ready.onnx", "int8.onnx"))
        onnx.save(network, fp32)
        quant_pre_process(str(fp32), str(ready), skip_symbolic_shape=True)
        reader = _Batches(preprocessed(prep, photos))
        quantize_static(str(ready), str(int8), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                        reduce_range=per_channel, calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(str(int8))
