"""The exported graph's first part, in ONNX ops: a decoded photo to the network's input, as predict's eval view.

`finegrain predict` reads a photo with albumentations: the shorter side resized to R = round(S / crop_pct) by
OpenCV's bilinear resize (the sides round(side x R / shorter), in float64), a centre S x S crop
(offset (side - S) // 2), then (x - 255 mean) / (255 std). ONNX's own Resize differs from OpenCV by one grey
level on about 1 pixel in 8 (OpenCV works in fixed point), which moves a small model's probabilities by 1e-2.
So the graph does OpenCV's INTER_LINEAR arithmetic on uint8 itself: per output column and row, the source
index and 11-bit weights computed as OpenCV does (float32 positions, weights rounded half to even, columns
clamped at the borders with the weight moved, rows clamped only), a horizontal pass in int32, then the
vertical pass as OpenCV's SIMD code rounds it, ((h0 >> 4) * w0 >> 16) + ((h1 >> 4) * w1 >> 16) + 2 >> 2.
Only the rows and columns inside the centre crop are computed. Checked equal to cv2.resize pixel for pixel
(tests/test_export.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "image"  # (B, H, W, 3) uint8 RGB, any H and W, one size per batch
OUTPUT = "pixels"  # (B, 3, S, S) float32, normalised
COEF = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE (11 bits)


def _axis(n, axis: str, src: str, dst: str, clamp_weight: bool) -> list:
    """Nodes giving {axis}_i0, {axis}_i1 (S,) int64 source indices and {axis}_w0, {axis}_w1 (S,) int32 weights
    of the S outputs inside the crop, for a source side `src` and a resized side `dst` ((1,) int64 tensors)."""
    a = axis
    nodes = [
        n("Squeeze", [dst], [f"{a}_dst_scalar"]),
        n("Range", ["zero_scalar", f"{a}_dst_scalar", "one_scalar"], [f"{a}_d"]),
        n("Cast", [f"{a}_d"], [f"{a}_d64"], to=TensorProto.DOUBLE),
        n("Cast", [src], [f"{a}_src64"], to=TensorProto.DOUBLE),
        n("Cast", [dst], [f"{a}_dst64"], to=TensorProto.DOUBLE),
        n("Div", [f"{a}_dst64", f"{a}_src64"], [f"{a}_inv_scale"]),
        n("Div", ["one64", f"{a}_inv_scale"], [f"{a}_scale"]),  # OpenCV: scale = 1 / (dst / src), in double
        n("Add", [f"{a}_d64", "half64"], [f"{a}_centre"]),
        n("Mul", [f"{a}_centre", f"{a}_scale"], [f"{a}_pos_scaled"]),
        n("Sub", [f"{a}_pos_scaled", "half64"], [f"{a}_pos64"]),
        n("Cast", [f"{a}_pos64"], [f"{a}_pos"], to=TensorProto.FLOAT),
        n("Floor", [f"{a}_pos"], [f"{a}_floor"]),
        n("Sub", [f"{a}_pos", f"{a}_floor"], [f"{a}_frac_raw"]),
        n("Cast", [f"{a}_floor"], [f"{a}_i_raw"], to=TensorProto.INT64),
        n("Sub", [src, "one"], [f"{a}_last"]),
    ]
    if clamp_weight:  # columns: outside the image the nearest border pixel takes the whole weight
        nodes += [
            n("Less", [f"{a}_i_raw", "zero"], [f"{a}_left"]),
            n("GreaterOrEqual", [f"{a}_i_raw", f"{a}_last"], [f"{a}_right"]),
            n("Or", [f"{a}_left", f"{a}_right"], [f"{a}_outside"]),
            n("Where", [f"{a}_outside", "zero_f32", f"{a}_frac_raw"], [f"{a}_frac"]),
            n("Where", [f"{a}_left", "zero", f"{a}_i_raw"], [f"{a}_i_left"]),
            n("Where", [f"{a}_right", f"{a}_last", f"{a}_i_left"], [f"{a}_i"]),
        ]
    else:  # rows: the weights stay, the rows are clamped
        nodes += [n("Identity", [f"{a}_frac_raw"], [f"{a}_frac"]), n("Identity", [f"{a}_i_raw"], [f"{a}_i"])]
    nodes += [
        n("Clip", [f"{a}_i", "zero_scalar", f"{a}_last_scalar"], [f"{a}_i0_all"]),
        n("Squeeze", [f"{a}_last"], [f"{a}_last_scalar"]),
        n("Add", [f"{a}_i", "one"], [f"{a}_next"]),
        n("Clip", [f"{a}_next", "zero_scalar", f"{a}_last_scalar"], [f"{a}_i1_all"]),
        n("Sub", ["one_f32", f"{a}_frac"], [f"{a}_rest"]),
        n("Mul", [f"{a}_rest", "coef_f32"], [f"{a}_w0_f"]),
        n("Mul", [f"{a}_frac", "coef_f32"], [f"{a}_w1_f"]),
        n("Round", [f"{a}_w0_f"], [f"{a}_w0_r"]),  # half to even, as OpenCV's saturate_cast<short>
        n("Round", [f"{a}_w1_f"], [f"{a}_w1_r"]),
        n("Cast", [f"{a}_w0_r"], [f"{a}_w0_all"], to=TensorProto.INT32),
        n("Cast", [f"{a}_w1_r"], [f"{a}_w1_all"], to=TensorProto.INT32),
        n("Sub", [dst, "crop"], [f"{a}_spare"]),
        n("Div", [f"{a}_spare", "two"], [f"{a}_start"]),  # floor division: both non-negative
        n("Add", [f"{a}_start", "crop"], [f"{a}_end"]),
    ]
    for part in ("i0", "i1", "w0", "w1"):
        nodes.append(n("Slice", [f"{a}_{part}_all", f"{a}_start", f"{a}_end", "zero"], [f"{a}_{part}"]))
    return nodes


def _sort_nodes(nodes: list, available) -> list:
    """`nodes` in an order where every input is `available` (graph inputs, constants) or produced before it is read."""
    ready, done, pending = set(available), [], list(nodes)
    while pending:
        for node in pending:
            if all(not i or i in ready for i in node.input):
                ready.update(node.output)
                done.append(node)
                pending.remove(node)
                break
        else:
            raise ValueError(f"unresolvable inputs in {[p.name or p.op_type for p in pending]}")
    return done


def preprocess_graph(*, image_size: int, resize: int, mean, std, opset: int, ir_version: int) -> onnx.ModelProto:
    """The preprocessing model: INPUT (B, H, W, 3) uint8 -> OUTPUT (B, 3, S, S) float32, S = image_size.

    Args:
        resize: the shorter side before the centre crop (predict's round(S / crop_pct)).
        mean, std: per-channel normalisation in [0, 1] units (3 values each).
    """
    s = image_size
    consts = {
        "zero": np.array([0], np.int64), "one": np.array([1], np.int64), "two": np.array([2], np.int64),
        "three": np.array([3], np.int64), "zero_scalar": np.array(0, np.int64), "one_scalar": np.array(1, np.int64),
        "one64": np.array([1.0]), "half64": np.array([0.5]), "resize": np.array([float(resize)]),
        "zero_f32": np.array(0.0, np.float32), "one_f32": np.array(1.0, np.float32),
        "coef_f32": np.array(COEF, np.float32), "crop": np.array([s], np.int64),
        "sixteen": np.array(16, np.int32), "shift16": np.array(65536, np.int32), "two_i32": np.array(2, np.int32),
        "four_i32": np.array(4, np.int32), "lo": np.array(0.0, np.float32), "hi": np.array(255.0, np.float32),
        "row_shape": np.array([1, s, 1, 1], np.int64), "col_shape": np.array([1, 1, s, 1], np.int64),
        "mean255": (np.asarray(mean, np.float32) * np.float32(255.0)).reshape(1, 3, 1, 1),
        "inv_std255": (np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))).reshape(1, 3, 1, 1),
    }
    n = helper.make_node
    nodes = [
        n("Shape", [INPUT], ["shape"]),
        n("Slice", ["shape", "one", "two"], ["height"]),
        n("Slice", ["shape", "two", "three"], ["width"]),
        n("Concat", ["height", "width"], ["hw"], axis=0),
        n("Cast", ["hw"], ["hw_f64"], to=TensorProto.DOUBLE),
        n("ReduceMin", ["hw_f64"], ["shorter"], keepdims=1),
        n("Div", ["resize", "shorter"], ["scale"]),
        n("Mul", ["hw_f64", "scale"], ["hw_scaled"]),
        n("Round", ["hw_scaled"], ["hw_round"]),  # Python's round(): half to even
        n("Cast", ["hw_round"], ["new_hw"], to=TensorProto.INT64),
        n("Slice", ["new_hw", "zero", "one"], ["new_height"]),
        n("Slice", ["new_hw", "one", "two"], ["new_width"]),
        *_axis(n, "y", "height", "new_height", clamp_weight=False),
        *_axis(n, "x", "width", "new_width", clamp_weight=True),
        n("Cast", [INPUT], ["image_i32"], to=TensorProto.INT32),
        # horizontal pass: (B, H, S, 3) int32 sums of two columns times 11-bit weights
        n("Gather", ["image_i32", "x_i0"], ["cols0"], axis=2),
        n("Gather", ["image_i32", "x_i1"], ["cols1"], axis=2),
        n("Reshape", ["x_w0", "col_shape"], ["x_w0_b"]),
        n("Reshape", ["x_w1", "col_shape"], ["x_w1_b"]),
        n("Mul", ["cols0", "x_w0_b"], ["h0"]),
        n("Mul", ["cols1", "x_w1_b"], ["h1"]),
        n("Add", ["h0", "h1"], ["horizontal"]),
        # vertical pass, rounded as OpenCV's SIMD code: (B, S, S, 3)
        n("Gather", ["horizontal", "y_i0"], ["rows0"], axis=1),
        n("Gather", ["horizontal", "y_i1"], ["rows1"], axis=1),
        n("Reshape", ["y_w0", "row_shape"], ["y_w0_b"]),
        n("Reshape", ["y_w1", "row_shape"], ["y_w1_b"]),
        n("Div", ["rows0", "sixteen"], ["rows0_s"]),
        n("Div", ["rows1", "sixteen"], ["rows1_s"]),
        n("Mul", ["rows0_s", "y_w0_b"], ["v0_full"]),
        n("Mul", ["rows1_s", "y_w1_b"], ["v1_full"]),
        n("Div", ["v0_full", "shift16"], ["v0"]),
        n("Div", ["v1_full", "shift16"], ["v1"]),
        n("Add", ["v0", "v1"], ["v_sum"]),
        n("Add", ["v_sum", "two_i32"], ["v_rounding"]),
        n("Div", ["v_rounding", "four_i32"], ["levels_i32"]),
        n("Cast", ["levels_i32"], ["levels_raw"], to=TensorProto.FLOAT),
        n("Clip", ["levels_raw", "lo", "hi"], ["levels"]),  # OpenCV saturates to uint8
        n("Transpose", ["levels"], ["nchw"], perm=[0, 3, 1, 2]),
        n("Sub", ["nchw", "mean255"], ["centred"]),
        n("Mul", ["centred", "inv_std255"], [OUTPUT]),
    ]
    graph = helper.make_graph(
        _sort_nodes(nodes, [INPUT, *consts]), "finegrain_preprocess",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 3, s, s])],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model
