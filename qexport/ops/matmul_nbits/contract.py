"""The contract of ONNX Runtime's com.microsoft::MatMulNBits, as qexport writes it.

Not a qexport op: ONNX Runtime's own contrib op (CPU and CUDA kernels ship with it), so a
model made of it needs no op library. Y = A · dequant(B)ᵀ (+ bias), B block-quantized along
K: code c of row n, block b dequantizes to (c − zero[n, b]) · scale[n, b]. Codes are packed
low bits first along K, `bits` per code; zero points likewise, per row.
"""

from ..group_query_attention import MS_DOMAIN as DOMAIN  # noqa: F401 (contrib ops)

OP_NAME = "MatMulNBits"
OPSET_VERSION = 1

SUPPORTED_BITS = (2, 4)  # what qexport writes (ONNX Runtime 1.32's CPU kernel also has 8)
MIN_BLOCK_SIZE = 16  # ONNX Runtime: a power of two >= 16

IN_A = 0
IN_B = 1
IN_SCALES = 2
IN_ZERO_POINTS = 3
IN_G_IDX = 4  # deprecated by ONNX Runtime; never written
IN_BIAS = 5
NUM_INPUTS = 6
INPUT_NAMES = ("A", "B", "scales", "zero_points", "g_idx", "bias")
OPTIONAL_INPUTS = (IN_ZERO_POINTS, IN_G_IDX, IN_BIAS)

ATTR_K = "K"
ATTR_N = "N"
ATTR_BITS = "bits"
ATTR_BLOCK_SIZE = "block_size"
ATTR_ACCURACY_LEVEL = "accuracy_level"  # 0: A stays fp32 (what qexport writes)
ATTRIBUTES = (ATTR_K, ATTR_N, ATTR_BITS, ATTR_BLOCK_SIZE, ATTR_ACCURACY_LEVEL)
