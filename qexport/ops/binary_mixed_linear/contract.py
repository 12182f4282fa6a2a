"""The contract of qexport::BinaryMixedLinear: inputs, attributes, packed layout.

Mirrored constant by constant by ``plugins/binary_mixed_linear/bml_contract.h``
(``tests/test_contract.py`` compares them); ``docs/format.md`` describes the format.
"""

OP_NAME = "BinaryMixedLinear"

# Packed weight layouts understood by the kernels (attribute "layout").
LAYOUT_ROW_MAJOR = 1  # docs/format.md, "Layout 1"
SUPPORTED_LAYOUTS = (LAYOUT_ROW_MAJOR,)

SALIENT_BITS = 4
SALIENT_QMAX = (1 << SALIENT_BITS) - 1

# Input positions.
IN_X = 0
IN_SIGN_PACKED = 1
IN_ROW_SCALE = 2
IN_ROW_OFFSET = 3
IN_SALIENT_IDX = 4
IN_SALIENT_PACKED = 5
IN_SALIENT_SCALE = 6
IN_SALIENT_ZERO = 7
IN_R2 = 8  # optional
IN_BIAS = 9  # optional
NUM_INPUTS = 10

INPUT_NAMES = (
    "X", "sign_packed", "row_scale", "row_offset", "salient_idx",
    "salient_packed", "salient_scale", "salient_zero", "r2", "bias",
)
OPTIONAL_INPUTS = (IN_R2, IN_BIAS)

# Attribute names, in the order the torch op takes them after its tensor inputs.
ATTR_IN_FEATURES = "in_features"
ATTR_OUT_FEATURES = "out_features"
ATTR_SALIENT_GROUP_SIZE = "salient_group_size"  # 0: one group per row
ATTR_LAYOUT = "layout"
ATTRIBUTES = (ATTR_IN_FEATURES, ATTR_OUT_FEATURES, ATTR_SALIENT_GROUP_SIZE, ATTR_LAYOUT)
