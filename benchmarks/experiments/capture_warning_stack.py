"""Runs benchmarks/check_cuda_graph.py for one case (argv[2], default lokr-lowrank-ckpt; 8 steps) and prints the
Python stack of every "operation not permitted when stream is capturing" warning: where a failed capture went
wrong (NOTES change 64).

    python benchmarks/experiments/capture_warning_stack.py OUT_DIR [CASE]
"""
import runpy
import sys
import traceback
import warnings

_orig = warnings.showwarning


def show(message, category, filename, lineno, file=None, line=None):
    if "capturing" in str(message):
        print("=== WARNING", message, file=sys.stderr)
        traceback.print_stack(file=sys.stderr)
    else:
        _orig(message, category, filename, lineno, file, line)


warnings.showwarning = show
case = sys.argv[2] if len(sys.argv) > 2 else "lokr-lowrank-ckpt"
sys.argv = ["check_cuda_graph.py", "--out", sys.argv[1], "--cases", case, "--steps", "8"]
runpy.run_path("benchmarks/check_cuda_graph.py", run_name="__main__")
