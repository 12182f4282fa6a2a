"""The qexport contract every op shares: ONNX domain, op-set and contract versions, and the
metadata keys of an export.

This file and ``plugins/common/qexport_contract.h`` state the same constants; each op's own
constants (inputs, attributes, packed layout) live in its package, mirrored by the op's C++
header (``qexport/ops/<op>/contract.py`` and ``plugins/<op>/*_contract.h``).
``tests/test_contract.py`` parses the headers and fails on any difference, and the compiled op
library reports its contract version at load time (``qexport.native``). The formats are
described in ``docs/format.md``.
"""

DOMAIN = "qexport"
OPSET_VERSION = 1  # version of the qexport ONNX op set

# Bump when any op's inputs, attributes or packed bit order change meaning.
CONTRACT_VERSION = 1

# Metadata keys written into model.onnx (Python only: no kernel reads them).
META_VERSION = "qexport.version"
META_SCHEME = "qexport.scheme"
META_CONFIG = "qexport.config"
META_CONTRACT = "qexport.contract_version"
META_SOURCE = "qexport.source"  # the MODEL argument the export was made from
META_VOCAB_SIZE = "qexport.vocab_size"
# On a qexport node that stacks several layers (passes.fuse_shared_input), a node
# metadata_props entry: JSON [[layer name, output rows], ...] in row order.
META_NODE_LAYERS = "qexport.layers"
# OS+ exports: JSON {original tensor name: initializer name} of the folded norm/fp tensors
META_OS_FOLDED = "qexport.os_folded"
