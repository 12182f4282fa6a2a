"""qexport: PTQ1.61 (~1.61-bit) export of PyTorch transformers to ONNX with compiled kernels.

    from qexport import QuantizeConfig, quantize, export, parse_scheme
    qm = quantize(module, example_inputs, calib_batches, QuantizeConfig(parse_scheme("w1.61a16")))
    export(qm, "out/model.onnx")

Importing this package loads no native library and imports no heavy module until used.
"""
__version__ = "0.1.0"

_LAZY = {"quantize": "api", "export": "api", "QuantizeConfig": "api", "QuantizedModel": "api",
         "parse_scheme": "schemes", "QexportError": "errors"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'qexport' has no attribute {name!r}")
