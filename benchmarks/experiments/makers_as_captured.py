#!/usr/bin/env python3
"""``benchmarks/train_step.py`` whose ``--graph-makers`` step runs with ``torch.cuda.is_current_stream_capturing``
answering True (issue 7, session 45). Same arguments as train_step.py.

``--graph-makers`` names the ops that launch a captured step's kernels from one *eager* run of the captured step's
paths (``graph_policy.graph_step``). Some of lyco's choices ask whether the stream is capturing instead:
:func:`.blas_sms.side` (cuBLAS told the side regions' SMs — the SM count its heuristics pick split-K by), the factor
batch (:mod:`.factor_batch`), the side streams' joins (:mod:`.lowrank`). Under this script they take their captured
forms in that eager run, so its kernels are the capture's (check: the makers' kernel counts against the traced
replay's). The step's numbers are not meant to be right: tensors of the side streams are not kept for the other
streams as a capture's pool keeps them. The timed capture and replays come after, with the flag restored.

    python3 benchmarks/experiments/makers_as_captured.py --models sdxl --batches 1 --variants lyco --algos lora,lokr \\
        --graph --graph-trace lora/lyco,lokr/lyco --graph-makers splitKreduce,splitK
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import train_step  # noqa: E402  (benchmarks/)

_ORIGINAL = train_step._graph_makers


def _as_captured(step, side, trace):
    def fake():
        real = torch.cuda.is_current_stream_capturing
        torch.cuda.is_current_stream_capturing = lambda: True
        try:
            step()
        finally:
            torch.cuda.is_current_stream_capturing = real
    _ORIGINAL(fake, side, trace)


if __name__ == "__main__":
    train_step._graph_makers = _as_captured
    train_step.main()
