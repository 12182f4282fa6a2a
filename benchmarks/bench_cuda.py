"""CUDA kernels of qexport::BinaryMixedLinear vs cuBLAS fp16 (torch.matmul), and parity with the
PyTorch reference. Needs a CUDA GPU, a CUDA build of torch and the test build of the kernels
(tests/gpu_helpers.py builds it: build/gpu-tests/libqexport_cuda_testlib.so). NOT run on the
machine it was written on (no GPU): see docs/gpu.md.

    python benchmarks/bench_cuda.py                       # M=1 (GEMV) and M=256 (GEMM) 4096x4096, fp16
    python benchmarks/bench_cuda.py --m 1 4 16 128 256 --k 4096 --n 11008 --salient 0.2

Prints, per shape: qexport kernel time (path auto, and each forced path: gemv for M <= 4, the
SIMT gemm, and the tensor-core gemm_tc on sm_80+; fp16 activations), torch fp16 matmul
time on the dequantized weight (cuBLAS), the weight bytes each reads and the effective GB/s,
and the max abs error of the kernel vs the PyTorch reference relative to max|ref|.
"""
from __future__ import annotations

import argparse
import ctypes
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--salient", type=float, default=0.2, help="salient fraction of K")
    ap.add_argument("--group", type=int, default=128, help="salient_group_size")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--lib", help="libqexport_cuda_testlib.so (default: build it, tests/gpu_helpers.py)")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA GPU visible to torch (needs a CUDA build of torch and a GPU)")
        return 2
    import gpu_helpers
    from test_gpu_kernels import run_cuda

    from qexport.ops.binary_mixed_linear import binary_mixed_linear_reference
    from qexport.testing import random_mixed_linear

    if args.lib:
        lib = ctypes.CDLL(args.lib)
    else:
        import pytest

        try:
            lib = gpu_helpers.cuda_testlib()
        except pytest.skip.Exception as e:
            print(f"bench_cuda: {e}")
            return 2
    lib.qx_bml_cuda_auto_path.restype = ctypes.c_char_p
    lib.qx_cuda_compute_capability.restype = ctypes.c_int
    cc = lib.qx_cuda_compute_capability()
    k, n = args.k, args.n
    s = int(round(args.salient * k))
    w = random_mixed_linear(n, k, s, args.group, with_r2=True, with_bias=False, seed=0)
    wbytes = sum(t.numel() * t.element_size() for t in w.tensors() if t is not None)
    # Dense fp16 weight with the same values, for cuBLAS.
    eye = torch.eye(k, dtype=torch.float32)
    dense = binary_mixed_linear_reference(eye, *w.tensors(), **w.attributes()).T.contiguous()
    dense16 = dense.half().cuda()
    print(f"K={k} N={n} S={s} G={args.group}: qexport weights {wbytes / 1e6:.2f} MB "
          f"({8 * wbytes / (n * k):.2f} bits/weight), fp16 dense {2 * n * k / 1e6:.2f} MB")
    for m in args.m:
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float16)
        ref = binary_mixed_linear_reference(torch.from_numpy(x), *w.tensors(),
                                            **w.attributes()).float().numpy()
        scale = float(np.abs(ref).max()) or 1.0
        auto = lib.qx_bml_cuda_auto_path(ctypes.c_int64(m), ctypes.c_int64(k), ctypes.c_int64(n),
                                         ctypes.c_int64(s), ctypes.c_int64(args.group),
                                         ctypes.c_int(1)).decode()
        for path, name in ((0, f"auto ({auto})"), (1, "gemv"), (2, "gemm"), (3, "gemm_tc")):
            if path == 1 and m > 4:
                continue
            if path == 3 and cc < 80:
                print(f"  M={m:5d} qexport gemm_tc: skipped (compute capability {cc} < 80)")
                continue
            y, flags, ms = run_cuda(lib, w, x, path, repeat=args.repeat)
            err = float(np.abs(y.astype(np.float32) - ref).max()) / scale
            print(f"  M={m:5d} qexport {name:14s}: {ms * 1e3:9.1f} us  "
                  f"{wbytes / (ms * 1e-3) / 1e9:7.1f} GB/s  rel err {err:.2e}  flags {flags}")
        xt = torch.from_numpy(x).cuda()
        for _ in range(10):
            xt @ dense16.T
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.repeat):
            xt @ dense16.T
        stop.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(stop) / args.repeat
        print(f"  M={m:5d} cuBLAS fp16            : {ms * 1e3:9.1f} us  "
              f"{2 * n * k / (ms * 1e-3) / 1e9:7.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
