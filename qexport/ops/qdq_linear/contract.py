"""The contract of qexport::QDQLinear, a Linear with static activation quantization.

It exists only between quantization and export: the exporter lowers each node to standard
ONNX ops (`lower`), the QDQ pattern ONNX Runtime fuses into integer kernels and TensorRT
builds INT8 layers from, so an export needs no op library:

    X -> [Clip(lo, hi)] -> QuantizeLinear(x_scale, x_zero) -> DequantizeLinear  \\
                                              w_q -> DequantizeLinear(w_scale, axis 1) -> MatMul -> [Add bias]

X is quantized per tensor, asymmetric, to uint8 codes within [act_qmin, act_qmax] (the Clip
only when that range is narrower than uint8's: 6-bit activations use [0, 63]); the weight is
int8 per output channel, symmetric (6-bit weights use [-31, 31]), stored [K, N] as MatMul's
B. The lowered nodes keep the op's inputs and attributes in their anchor's metadata
(META_LOWERED), so a file reads back into the op (`qexport.artifact`).
"""
from ...contract import DOMAIN  # noqa: F401  (the op's domain before lowering)

OP_NAME = "QDQLinear"

IN_X = 0
IN_W_Q = 1
IN_W_SCALE = 2
IN_X_SCALE = 3
IN_X_ZERO = 4
IN_BIAS = 5
NUM_INPUTS = 6
INPUT_NAMES = ("X", "w_q", "w_scale", "x_scale", "x_zero", "bias")
OPTIONAL_INPUTS = (IN_BIAS,)

ATTR_IN_FEATURES = "in_features"
ATTR_OUT_FEATURES = "out_features"
ATTR_ACT_QMIN = "act_qmin"
ATTR_ACT_QMAX = "act_qmax"
ATTRIBUTES = (ATTR_IN_FEATURES, ATTR_OUT_FEATURES, ATTR_ACT_QMIN, ATTR_ACT_QMAX)

# On the lowered pattern's MatMul (the anchor): JSON {"op", "inputs", "attributes"} of the
# QDQLinear node it replaced.
META_LOWERED = "qexport.lowered"
