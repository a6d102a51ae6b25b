"""INT8 by explicit quantization: Q/DQ nodes with calibrated scales inserted into the fp32 ONNX.

TensorRT 11 removed implicit INT8 (BuilderFlag.INT8 and the IInt8 calibrators); INT8 now comes
only from QuantizeLinear/DequantizeLinear nodes in the graph, which a strongly typed build
follows ("Removed Python APIs and Replacements", TensorRT 10.x -> 11.x migration guide;
"Explicit Quantization", docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
quantized-types-explicit-quantization.html). The same graph runs under onnxruntime, which is how
it is checked here without a GPU.

onnxruntime.quantization's QDQ quantizer does the work, set up the way TensorRT reads Q/DQ:
symmetric signed INT8 for activations and weights (TensorRT's quantization is symmetric),
per-channel weight scales, per-tensor activation scales from a percentile of the activations
seen on calibration tiles, Q/DQ only on the inputs of convolutions (not their outputs), biases
left in float. The first convolution stays in float: its input is the normalized intensity,
where 8 bits lose the most, and with one input channel it costs least. Transposed convolutions
(2x2x2 upsampling, a small share of the FLOPs) stay in float too.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.model.contract import INPUT_NAME

log = logging.getLogger("sparseseg.export.quantize")

# Calibration reads small tiles: activation statistics are per tensor, so a tile a few times the
# network's context suffices, and onnxruntime's calibrator keeps every intermediate tensor of a
# tile in memory (tens of GB for a paper-sized tile of the paper network). For a valid network
# whose context exceeds this budget, the smallest valid tile is used.
CALIBRATION_INPUT = (48, 64, 64)
CALIBRATION_TILES = 8
PERCENTILE = 99.99


def calibration_shape(geometry) -> tuple[int, int, int]:
    """The largest valid input tile within CALIBRATION_INPUT (at least the smallest valid one)."""
    shape = []
    for rule, budget in zip(geometry.axes, CALIBRATION_INPUT):
        if geometry.padding == "valid":
            m = rule.output_at_most(budget - 2 * rule.context)
            m = m if m and m >= rule.step else rule.output_at_least(rule.step)
            shape.append(rule.input_for_output(m))
        else:
            shape.append(max(rule.step, budget // rule.step * rule.step))
    return tuple(shape)


def calibration_tiles(volume_path, channels: int, shape, count: int = CALIBRATION_TILES, seed: int = 0):
    """`count` float32 tiles (1, C, Z, Y, X) at random places of the calibration volume (reflect
    padding where the volume is smaller than the tile)."""
    from sparseseg.engine.tiling import pad_region
    from sparseseg.volume import check_finite, open_volume

    vol = open_volume(volume_path)
    if vol.channels != channels:
        raise SparsesegError(f"--calibration {volume_path} has {vol.channels} channel(s), the model expects {channels}")
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(count):
        start = [int(rng.integers(0, max(1, n - s + 1))) for n, s in zip(vol.shape, shape)]
        t = np.array(vol.read(tuple(slice(a, a + s) for a, s in zip(start, shape)), dtype=np.float32))
        check_finite(t, f"--calibration {volume_path}")
        if t.shape[1:] != tuple(shape):
            t = pad_region(t, (0, 0, 0), [s - n for s, n in zip(shape, t.shape[1:])])
        tiles.append(np.ascontiguousarray(t[None], np.float32))
    return tiles


def _reader(tiles):
    from onnxruntime.quantization import CalibrationDataReader

    class TileReader(CalibrationDataReader):
        """Tiles one range at a time (set_range): the quantizer then calibrates tile by tile,
        merging histograms, instead of holding every intermediate tensor of every tile."""

        def __init__(self):
            self.set_range(0, len(tiles))

        def __len__(self):
            return len(tiles)

        def set_range(self, start_index, end_index):
            self._it = iter(tiles[start_index:end_index])

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {INPUT_NAME: x}

        def rewind(self):
            self.set_range(0, len(tiles))

    return TileReader()


def first_conv(proto) -> str:
    """Name of the first Conv node (ONNX nodes are stored in topological order)."""
    for node in proto.graph.node:
        if node.op_type == "Conv":
            return node.name
    raise SparsesegError("the exported graph has no Conv node to quantize")


def quantize_int8(fp32_path: Path, out_path: Path, tiles, percentile: float = PERCENTILE) -> dict:
    """Write the Q/DQ (int8) version of the fp32 ONNX model at `fp32_path` to `out_path`;
    returns how it was calibrated (for the contract)."""
    import onnx

    proto = onnx.load(str(fp32_path))
    for node in proto.graph.node:    # the quantizer needs node names to exclude one
        if not node.name:
            raise SparsesegError("the exported graph has an unnamed node; cannot quantize it")
    keep_float = [first_conv(proto)]
    with _quiet():
        _quantize_static(fp32_path, out_path, tiles, keep_float, percentile)
    return {"method": "onnxruntime QDQ, symmetric int8, per-channel weights, per-tensor activations",
            "activation_percentile": percentile, "tiles": len(tiles),
            "tile_input": list(tiles[0].shape[2:]), "float_nodes": keep_float}


@contextlib.contextmanager
def _quiet():
    """The quantizer prints its progress to stdout and warns on the root logger; the CLI's
    stdout is for its own lines (and --json), so both go to this module's debug log."""
    class _Drop(logging.Filter):
        def filter(self, record):
            log.debug("onnxruntime.quantization: %s", record.getMessage())
            return False

    buf, drop, root = io.StringIO(), _Drop(), logging.getLogger()
    root.addFilter(drop)
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        root.removeFilter(drop)
        if buf.getvalue():
            log.debug("onnxruntime.quantization output:\n%s", buf.getvalue())


def _quantize_static(fp32_path, out_path, tiles, keep_float, percentile):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32_path), str(out_path), _reader(tiles),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=keep_float,
        calibrate_method=CalibrationMethod.Percentile,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": ["Conv"],
            "CalibPercentile": percentile,
            # despite its name, the quantizer calibrates in strides of this many tiles with any
            # method (onnxruntime/quantization/quantize.py): memory for one tile's activations
            "CalibStridedMinMax": 1,
        },
    )
