"""qexport: PTQ1.61 (~1.61-bit) export of PyTorch transformers to ONNX with compiled kernels.

Importing this package loads no native library and imports no heavy module until used.
"""
__version__ = "0.1.0"
