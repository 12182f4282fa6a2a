"""ONNX Runtime with the qexport op library (CPU kernels; CUDA ones where built): the default
target. The folder gets libqexport_ops.so; attention is one contrib GroupQueryAttention node
per block where the model's family has an attention swap."""
from . import Target, register

TARGET = register(Target("ort", "ONNX + the qexport op library for ONNX Runtime"))
