"""Does a memset node cost a CUDA graph more than a kernel node doing the same, and more where the graph has
concurrent branches? (issue 7, session 41: run 292's SD1.5 b1 LoKr graph waits 9.3 µs on average from each of its 95
memset nodes — cuDNN attention's, cuDNN conv's, cuBLAS's — to the kernel after it, the floor's single-stream graph 5.3;
and 3.2 µs before each memset against 1.3.)

A chain of ``--links`` links, each a small kernel, a zeroing of a 64 KiB buffer, and a kernel reading that buffer,
captured as one graph four ways: the zeroing as a memset node (``cudaMemsetAsync`` during capture) or as a kernel
(``fill_``), with and without a side stream forked and joined every four links running kernels of its own. Prints the
replay time per link (median of CUDA-event-timed replays) and the memset nodes counted in each graph by the driver
(``cuGraphGetNodes`` on ``CUDAGraph(keep_graph=True)``'s graph).

Runs 294 (H200): memset 4.25 / fill 4.09 / replaced 4.30 µs a link, with the side stream 4.75 / 4.59 / 4.78 — a
memset node costs 0.16 µs more than a kernel node here, nothing like the step's 4 µs. Run 295 added cuDNN attention
(forward and backward, SD1.5's 64×64 self-attention, 16 links; its own memset nodes): 305.6 µs a link as captured,
303.1 with its 33 memset nodes replaced (+side 307.2 / 305.7). Both ran this script's own copy of the replacement
(a PTX store loop: byte-wise in run 294, aligned byte runs as words in run 295); it now calls
``lyco.train.graph_memsets``, which run 296's step probe led to.

    python benchmarks/experiments/memset_node_bench.py [--links 64] [--out DIR]
"""

import argparse
import ctypes
import json
import os

import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from _common import replay_us  # noqa: E402

from lyco.train import graph_memsets  # noqa: E402


def _cudart():
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("no libcudart")


def _count_memset_nodes(graph) -> tuple[int, int]:
    """(memset nodes, all nodes) of a kept graph."""
    cu = graph_memsets._driver()
    nodes = graph_memsets._nodes(cu.cuGraphGetNodes, ctypes.c_void_p(graph.raw_cuda_graph()))
    return graph_memsets.memset_nodes(graph), len(nodes)


def memsets_to_kernels(graph) -> int:
    """Runs 294-295 replaced the memset nodes with this script's own copy of what is now
    ``lyco.train.graph_memsets`` (a byte-wise PTX loop then, words now)."""
    return graph_memsets._replace_all(graph, torch.cuda.current_device())


def sdpa_cases(links: int, res: dict):
    """cuDNN attention (its own memset node before each kernel, as in the step) in a chain with a projection GEMM per
    link — SD1.5's 64×64 self-attention shape, batch 1 — forward and backward, as captured and with its memset nodes
    made kernels; with and without a side stream forked and joined around each link running a GEMM."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev, dt = torch.device("cuda"), torch.bfloat16
    w = torch.randn(320, 320, device=dev, dtype=dt) * 0.05
    x = torch.randn(1, 4096, 320, device=dev, dtype=dt, requires_grad=True)
    sw = torch.randn(640, 640, device=dev, dtype=dt) * 0.05
    sx = torch.randn(1024, 640, device=dev, dtype=dt)
    side = torch.cuda.Stream()

    def body(branches: bool):
        main_s = torch.cuda.current_stream()
        h = x
        for _ in range(links):
            if branches:
                side.wait_stream(main_s)
                with torch.cuda.stream(side):
                    torch.mm(sx, sw)
            q = (h @ w).view(1, 4096, 8, 40).transpose(1, 2)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            h = o.transpose(1, 2).reshape(1, 4096, 320)
            if branches:
                main_s.wait_stream(side)
        h.float().square().mean().backward()

    for branches in (False, True):
        for surgery in (False, True):
            name = f"sdpa{'-surgery' if surgery else ''}{'+side' if branches else ''}"
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                body(branches)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            x.grad = None
            g = torch.cuda.CUDAGraph(keep_graph=True)
            try:
                with torch.cuda.graph(g):
                    body(branches)
                replaced = memsets_to_kernels(g) if surgery else 0
                ms, nn = _count_memset_nodes(g)
                g.instantiate()
                us = replay_us(g, links, replays=21, warmup=3)
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                print(f"{name}: failed: {e!r}", flush=True)
                continue
            res["cases"][name] = dict(us_per_link=us, memset_nodes=ms, nodes=nn, replaced=replaced)
            print(f"{name:20s} {us:7.2f} us/link (fwd+bwd)  ({ms} memset nodes of {nn}; {replaced} replaced)",
                  flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--links", type=int, default=64)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    rt = _cudart()
    rt.cudaMemsetAsync.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p]
    dev = torch.device("cuda")
    x = torch.randn(320 * 4096, device=dev, dtype=torch.bfloat16)
    bufs = [torch.ones(32768, device=dev, dtype=torch.bfloat16) for _ in range(a.links)]
    side_x = torch.randn(320 * 4096, device=dev, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    res = {"device": torch.cuda.get_device_name(), "links": a.links, "cases": {}}
    x0 = x.clone()
    ref = {}

    def body(memset: bool, branches: bool):
        main_s = torch.cuda.current_stream()
        for i, b in enumerate(bufs):
            if branches and i % 4 == 0:
                side.wait_stream(main_s)
                with torch.cuda.stream(side):
                    side_x.mul_(1.0001)
                    side_x.add_(0.5)
            x.mul_(1.0001)
            if memset:  # True or "surgery"
                assert rt.cudaMemsetAsync(ctypes.c_void_p(b.data_ptr()), 0, b.numel() * 2,
                                          ctypes.c_void_p(main_s.cuda_stream)) == 0
            else:
                b.fill_(0)
            x[: b.numel()].add_(b)
            if branches and i % 4 == 3:
                main_s.wait_stream(side)

    for branches in (False, True):
        for memset in (True, False, "surgery"):
            name = f"{'memset' if memset is True else 'fill' if not memset else 'surgery'}{'+side' if branches else ''}"
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                body(memset, branches)  # warm-up
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph(keep_graph=True)
            with torch.cuda.graph(g):
                body(memset, branches)
            replaced = 0
            if memset == "surgery":
                try:
                    replaced = memsets_to_kernels(g)
                except Exception as e:  # noqa: BLE001 - a probe: report and go on
                    print(f"{name}: surgery failed: {e!r}", flush=True)
                    continue
            ms, nn = _count_memset_nodes(g)
            g.instantiate()
            # same state in, same result out: one replay from x0 against the memset graph's
            x.copy_(x0)
            for b in bufs:
                b.fill_(1)
            g.replay()
            torch.cuda.synchronize()
            if memset is True:
                ref[branches] = x.clone()
            elif memset == "surgery":
                print(f"{name}: {replaced} memset nodes replaced; result equal to the memset graph's: "
                      f"{torch.equal(x, ref[branches])}", flush=True)
            us = replay_us(g, a.links, replays=21, warmup=3)
            res["cases"][name] = dict(us_per_link=us, memset_nodes=ms, nodes=nn)
            print(f"{name:12s} {us:6.2f} us/link  ({ms} memset nodes of {nn})", flush=True)
    sdpa_cases(a.links // 4, res)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "memset_node_bench.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
