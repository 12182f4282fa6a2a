"""The op registry: every op qexport writes into a graph, as one `OpSpec` row.

An op module (``qexport/ops/<op>``) defines the op's torch custom op (under
``torch.ops.qexport``), its reference implementation, ONNX schema and translation, an
onnx.reference OpRun and, for ops that replace a Linear, its packed-weight class; it then
calls `register(OpSpec(...))`. Passes, checks, the exporter and the artifact reader go through
the spec (`spec_of_node`, `spec_of_weights`, `spec_of_onnx_node`, `apply`, ...), never through
a concrete op. docs/extending.md lists what adding an op touches.

Packed-weight classes share one interface (duck-typed; `MixedLinearWeights` is the model):
``in_features``, ``out_features``, ``tensors()`` (the op's weight inputs, in order),
``attributes()`` (name -> int), ``from_inputs(tensors, attributes)``, ``validate()``,
``weight_nbytes()``, ``bits_per_weight()``, ``dequantize()``, ``stacks_with(other)``,
``stack(parts)`` and ``rows(start, stop)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..registry import Registry

# The op modules, imported (and so registered) on first use; one line per op.
_OP_MODULES = ("binary_mixed_linear", "group_query_attention", "matmul_nbits", "qdq_linear",
               "skip_rms_norm")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op: how it appears in torch graphs, in ONNX and to the runtimes."""
    name: str  # ONNX op type
    domain: str  # ONNX domain
    torch_name: str  # torch.ops.qexport.<torch_name>
    input_names: tuple[str, ...]  # ONNX inputs, in order (the torch op's tensor arguments)
    attributes: tuple[str, ...]  # int/float attributes after the tensors, in order
    register_schema: Callable[[], None]  # onnx.defs schema (checker, exporter)
    translate: Callable  # torch.onnx custom_translation_table entry
    reference: Callable  # the reference implementation (PyTorch)
    op_run: Callable[[], type] | None = None  # -> onnx.reference OpRun class (None: ORT only)
    weights: type | None = None  # packed-weight class of an op that replaces a Linear
    library: bool = False  # runs from libqexport_ops (else a runtime's own op)
    version: int = 1
    # An op that exists only until export: lower(node, value, add_initializer) -> the standard
    # nodes replacing it in the file (value: initializer name -> numpy array), and
    # raise_node(node) -> the op's node again from its lowered anchor node, or None.
    lower: Callable | None = None
    raise_node: Callable | None = None

    @property
    def torch_op(self):
        return getattr(torch.ops.qexport, self.torch_name).default

    @property
    def num_weights(self) -> int:
        """Weight inputs of a Linear op (every input but the activation)."""
        return len(self.input_names) - 1


_REGISTRY: Registry[OpSpec] = Registry(__name__, _OP_MODULES, "op")


def has_schema(name: str, version: int, domain: str) -> bool:
    """Whether onnx already knows the schema (declared once per process by an op module)."""
    import onnx

    try:
        onnx.defs.get_schema(name, version, domain)
        return True
    except onnx.defs.SchemaError:
        return False


def register_linear_schema(name: str, domain: str, version: int, doc: str,
                           input_names: tuple, optional: tuple, types: dict, output_type: str,
                           type_constraints: list, attributes: tuple,
                           attribute_docs: dict | None = None) -> None:
    """Declare a Linear op's ONNX schema to onnx (checker, shape inference, exporter), once:
    one formal input per name (`types[name]`, optional where its index is in `optional`), one
    output Y, int attributes."""
    import onnx
    from onnx.defs import OpSchema

    if has_schema(name, version, domain):
        return
    single, opt = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    docs = attribute_docs or {}
    onnx.defs.register_schema(OpSchema(
        name, domain, version, doc=doc,
        inputs=[OpSchema.FormalParameter(n, types[n], param_option=opt if i in optional
                                         else single) for i, n in enumerate(input_names)],
        outputs=[OpSchema.FormalParameter("Y", output_type)],
        type_constraints=type_constraints,
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, docs.get(a, a))
                    for a in attributes]))


def check_tensors(expect: dict) -> None:
    """ValueError unless each name -> (tensor, dtype, shape) holds a tensor of that dtype and
    shape (the packed-weight classes' `validate`)."""
    for name, (t, dtype, shape) in expect.items():
        if t is None or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            got = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {got}")


def register(spec: OpSpec) -> OpSpec:
    return _REGISTRY.add(spec.name, spec)


def specs() -> list[OpSpec]:
    return _REGISTRY.rows()


def get(name: str) -> OpSpec:
    spec = _REGISTRY.get(name)
    if spec is None:
        raise KeyError(f"no op {name!r}; registered: {', '.join(_REGISTRY.keys())}")
    return spec


def linear_specs() -> list[OpSpec]:
    """The ops that replace a Linear (they have a packed-weight class)."""
    return [s for s in specs() if s.weights is not None]


def spec_of_weights(weights) -> OpSpec:
    for s in linear_specs():
        if isinstance(weights, s.weights):
            return s
    raise TypeError(f"no registered op packs {type(weights).__name__}")


def spec_of_node(node: torch.fx.Node) -> OpSpec | None:
    """The Linear op an fx node calls, or None."""
    if node.op != "call_function":
        return None
    for s in linear_specs():
        if node.target == s.torch_op:
            return s
    return None


def spec_of_onnx_node(node) -> OpSpec | None:
    """The Linear op of an onnx NodeProto, or None (also for ops of other domains). A lowered
    op's anchor node is not its op: `raised(node)` first."""
    for s in linear_specs():
        if node.domain == s.domain and node.op_type == s.name:
            return s
    return None


def raised(node):
    """The op node a lowered pattern's anchor stands for, else `node` itself."""
    for s in specs():
        if s.raise_node is not None:
            op = s.raise_node(node)
            if op is not None:
                return op
    return node


def lower_model(model) -> int:
    """Replace, in an onnx ModelProto, every node of an op that only exists until export by
    its standard nodes (OpSpec.lower), in place; drop the qexport opset import when no node
    uses the domain any more. Returns the number of nodes lowered."""
    from onnx import numpy_helper

    lowering = {(s.domain, s.name): s for s in specs() if s.lower is not None}
    graph = model.graph
    if not any((n.domain, n.op_type) in lowering for n in graph.node):
        return 0
    inits = {t.name: t for t in graph.initializer}

    def value(name):
        return numpy_helper.to_array(inits[name])

    def add_initializer(name, array):
        graph.initializer.append(numpy_helper.from_array(array, name))

    nodes, count = [], 0
    for n in graph.node:
        spec = lowering.get((n.domain, n.op_type))
        if spec is None:
            nodes.append(n)
        else:
            nodes.extend(spec.lower(n, value, add_initializer))
            count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {n.domain for n in graph.node}
    keep = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return count


def needs_library(model) -> bool:
    """Whether an onnx ModelProto has a node only the qexport op library runs."""
    library = {(s.domain, s.name) for s in specs() if s.library}
    return any((n.domain, n.op_type) in library for n in model.graph.node)


def node_args(spec: OpSpec, x, weight_inputs: list, attributes: dict) -> tuple:
    """Arguments of a call to `spec`'s torch op: x, the weight inputs, the attributes."""
    return (x, *weight_inputs, *(attributes[a] for a in spec.attributes))


def weights_of_node(spec: OpSpec, node: torch.fx.Node, get_tensor: Callable):
    """The packed weights an fx node of `spec` holds (get_tensor: get_attr node -> tensor)."""
    n = spec.num_weights
    tensors = [None if a is None else get_tensor(a) for a in node.args[1:1 + n]]
    return spec.weights.from_inputs(tensors, dict(zip(spec.attributes, node.args[1 + n:])))


def apply(x: torch.Tensor, weights) -> torch.Tensor:
    """Run the op of `weights` on x (eager, the reference)."""
    spec = spec_of_weights(weights)
    return spec.torch_op(*node_args(spec, x, weights.tensors(), weights.attributes()))


def register_onnx_schemas() -> None:
    for s in specs():
        s.register_schema()


def onnx_translation_table() -> dict:
    """custom_translation_table for torch.onnx.export(dynamo=True)."""
    register_onnx_schemas()
    return {s.torch_op: s.translate for s in specs()}


def reference_evaluator_ops() -> list:
    """OpRun classes for onnx.reference.ReferenceEvaluator(model, new_ops=...)."""
    register_onnx_schemas()
    return [s.op_run() for s in specs() if s.op_run is not None]


def single_op_model(weights, dtype=None):
    """A one-node ONNX model computing `weights`' op on X [batch, rows, K] (per-layer parity;
    3-D as in a model, so that ONNX Runtime picks the same kernels, e.g. its QDQ MatMul
    fusion, which a 2-D input with a bias would turn into a float Gemm instead)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from ..contract import OPSET_VERSION

    spec = spec_of_weights(weights)
    spec.register_schema()
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype or np.float32))
    names, inits = ["X"], []
    for name, t in zip(spec.input_names[1:], weights.tensors()):
        names.append(name if t is not None else "")
        if t is not None:
            inits.append(numpy_helper.from_array(t.numpy(), name))
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(spec.name, names, ["Y"], domain=spec.domain,
                            **weights.attributes())
    graph = helper.make_graph(
        [node], "layer",
        [helper.make_tensor_value_info("X", elem, ["batch", "rows", weights.in_features])],
        [helper.make_tensor_value_info("Y", elem, ["batch", "rows", weights.out_features])],
        inits)
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid(spec.domain, OPSET_VERSION)])
    model.ir_version = 10
    lower_model(model)
    return model
