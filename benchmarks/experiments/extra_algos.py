#!/usr/bin/env python3
"""``benchmarks/train_step.py`` with extra lyco-only configurations, for questions the main table does not
ask (issue 7 experiments). Same arguments as train_step.py; the extra names can be passed to ``--algos``:

* ``lora-kr`` — a plain LoRA with LoHa's Khatri–Rao shapes (lin rank 64 = 8·8, conv rank 16 = 4·4, on
  ``lin+conv``): LoHa's GEMMs and convs without the Khatri–Rao builds, so ``loha − lora-kr`` (same run, as a
  CUDA graph) is what building the two Khatri–Rao factors and their backward costs per step.

    python3 benchmarks/experiments/extra_algos.py --models sd15 --batches 8 --libs lyco --variants lyco \\
        --algos loha,lora-kr --baselines floor --graph
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import train_step  # noqa: E402  (benchmarks/)

EXTRA = {
    "lora-kr": dict(layers="lin+conv", lyco=dict(algo="lora", rank=64, alpha=64, conv_rank=16, conv_alpha=16),
                    lycoris=None, peft=None),
}

if __name__ == "__main__":
    train_step.ALGOS.update(EXTRA)
    train_step.main()
