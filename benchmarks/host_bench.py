#!/usr/bin/env python3
"""Host (CPU) cost of one adapted layer's forward + backward: the time to *issue* a step, which is the
step time on a launch-bound host (every eager SD1.5 step measured here). 20 layers of one kind, each
with one adapter, bf16 on the GPU (tiny fp32 widths on a CPU, where compute dominates less), 100 steps
after 10 warm-up; prints µs per layer. Compare checkouts by passing another ``src`` folder:

    python benchmarks/host_bench.py src [prof | name,name…]
    git archive <rev> src | tar -x -C /tmp/old && python benchmarks/host_bench.py /tmp/old/src

``prof``: a cProfile table of the Full configurations (where the Python time goes).
"""

import cProfile
import io
import pstats
import sys
import time

src = sys.argv[1] if len(sys.argv) > 1 else "src"
sys.path.insert(0, src)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import lyco  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
C, T = (320, 256) if dev == "cuda" else (16, 4)
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
CONFIGS = [("full", dict(algo="full")), ("ia3", dict(algo="ia3")), ("dora", dict(algo="lora", rank=16, dora=True)),
           ("lora", dict(algo="lora", rank=16)), ("full-conv", dict(algo="full")),
           ("lora-conv3", dict(algo="lora", rank=8)), ("loha", dict(algo="loha", rank=8)),
           ("loha-conv3", dict(algo="loha", rank=4)), ("lokr", dict(algo="lokr", rank=4, factor=4)),
           ("lokr-conv3", dict(algo="lokr", rank=4, factor=4))]
if len(sys.argv) > 2 and sys.argv[2] not in ("prof",):
    CONFIGS = [c for c in CONFIGS if c[0] in sys.argv[2].split(",")]


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


res = []
for name, kw in CONFIGS:
    if name.endswith("-conv") or name.endswith("-conv3"):
        k = 3 if name.endswith("-conv3") else 1
        model = nn.Sequential(*[nn.Conv2d(C, C, k, padding=k // 2) for _ in range(20)]).to(dev, dtype)
        x = torch.randn(2, C, 4 if dev == "cpu" else 16, 4 if dev == "cpu" else 16, device=dev, dtype=dtype)
    else:
        model = nn.Sequential(*[nn.Linear(C, C) for _ in range(20)]).to(dev, dtype)
        x = torch.randn(2, T, C, device=dev, dtype=dtype)
    x.requires_grad_(True)
    model.requires_grad_(False)
    lyco.create(model, preset="full", dtype=dtype, **kw)
    for _ in range(10):
        model(x).float().sum().backward()
    sync()
    n = 100
    t = time.perf_counter()
    for _ in range(n):
        model(x).float().sum().backward()
    host = (time.perf_counter() - t) / n / 20 * 1e6
    sync()
    wall = (time.perf_counter() - t) / n / 20 * 1e6
    res.append(f"{name:9s} host {host:6.1f} us/layer  wall {wall:6.1f}")
    if name.startswith("full") and "prof" in sys.argv:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            model(x).float().sum().backward()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
        print(s.getvalue()[:3000])
print(src, dev, *res, sep="\n  ")
