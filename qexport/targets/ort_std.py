"""ONNX Runtime with its own ops only: a folder that runs on any ONNX Runtime build (web,
mobile, a managed service, a Triton server without the qexport library). w4a16 is written as
com.microsoft MatMulNBits (the same codes as the qexport op), w2a16 likewise, w8a8/w6a6 as
standard QDQ; a scheme with binary weights is refused before any work."""
from . import Target, register

TARGET = register(Target("ort-std", "ONNX Runtime's own ops only, no op library (w4a16, w2a16, "
                         "w8a8, w6a6)", standard_ops=True))
