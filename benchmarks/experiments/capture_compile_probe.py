"""Runs benchmarks/check_cuda_graph.py for the cases in argv[2] (comma-separated) and reports every Triton
compilation: the kernel, its specialisation, and — where a CUDA-graph capture is under way on the calling thread's
current stream — the Python stack. A compilation during a capture loads a module there, which can invalidate the
capture (the intermittent "operation not permitted when stream is capturing" of NOTES change 64).

    python benchmarks/experiments/capture_compile_probe.py OUT_DIR lokr,lokr-lowrank-ckpt
"""
import runpy
import sys
import traceback

import torch
from triton import knobs


def hook(*args, **kwargs):
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    print(f"=== TRITON COMPILE capturing={capturing} {kwargs.get('repr', '')[:300]}", file=sys.stderr, flush=True)
    if capturing:
        traceback.print_stack(file=sys.stderr)
    return None


knobs.runtime.jit_cache_hook = hook
sys.argv = ["check_cuda_graph.py", "--out", sys.argv[1], "--cases", sys.argv[2], "--steps", "8"]
runpy.run_path("benchmarks/check_cuda_graph.py", run_name="__main__")
