"""The qexport op contract: ONNX domain, op names and versions, packed-weight format.

This file and ``plugins/common/qexport_contract.h`` state the same constants; the test
``tests/test_contract.py`` parses the header and fails on any difference, and the compiled
op library reports its contract version at load time (``qexport.native``). The format is
described in ``docs/format.md``.
"""

DOMAIN = "qexport"
OPSET_VERSION = 1  # version of the qexport ONNX op set

# Bump when anything below changes meaning (inputs, attributes, bit order).
CONTRACT_VERSION = 1

OP_BINARY_MIXED_LINEAR = "BinaryMixedLinear"

# Packed weight layouts understood by the kernels (attribute "layout").
LAYOUT_ROW_MAJOR = 1  # docs/format.md, "Layout 1"
SUPPORTED_LAYOUTS = (LAYOUT_ROW_MAJOR,)

SALIENT_BITS = 4
SALIENT_QMAX = (1 << SALIENT_BITS) - 1

# Input positions of BinaryMixedLinear.
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

# Attribute names.
ATTR_IN_FEATURES = "in_features"
ATTR_OUT_FEATURES = "out_features"
ATTR_SALIENT_GROUP_SIZE = "salient_group_size"  # 0: one group per row
ATTR_LAYOUT = "layout"

# Metadata keys written into model.onnx.
META_VERSION = "qexport.version"
META_SCHEME = "qexport.scheme"
META_CONFIG = "qexport.config"
META_CONTRACT = "qexport.contract_version"
META_SOURCE = "qexport.source"  # the MODEL argument the export was made from
# On a qexport node that stacks several layers (passes.fuse_shared_input), a node
# metadata_props entry: JSON [[layer name, output rows], ...] in row order.
META_NODE_LAYERS = "qexport.layers"
# OS+ exports: JSON {original tensor name: initializer name} of the folded norm/fp tensors
META_OS_FOLDED = "qexport.os_folded"
