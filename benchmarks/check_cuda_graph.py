"""GPU correctness check of ``[train] cuda_graph``: lyco's real trainer, eager vs graphed, same seed.

CI has no GPU, so ``tests/train/test_graphs.py`` checks the capture/replay plumbing with a stand-in for
the CUDA graph; this script checks the real capture on a GPU. For each case it trains the built-in
tiny SD1 model on a generated dataset (two aspect-ratio buckets → two graphs) twice — eager and with
``cuda_graph = true`` — and compares every tensor of the two saved adapters (relative L2 and max abs),
and, from fresh trainers, the gradients of the first micro-batch and the gradients after the
parameters were perturbed and moved in place (``moved_gradients``; the pass/fail criterion, both: the
adapters after several Adam steps amplify rounding differences, gradients do not). It also
reports whether the step was captured (a step that cannot be captured falls back to eager with a
warning; that is reported as a failure here) and the wall time of both runs (setup and caching
included: a smoke figure, not a benchmark — ``benchmarks/train_graph.py`` measures speed).

    python benchmarks/check_cuda_graph.py --out DIR [--cases lora,lokr,...] [--steps 12]

Writes ``DIR/check_cuda_graph.json``; exit code 1 when a case's gradients differ by more than
``--tol`` relative L2 or its step was not captured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# LoHa's/LoKr's factor kernels and the low-rank bypass op run by default only in steps captured as graphs
# (lyco/algorithms/graph_policy.py): both runs compared here take them, so eager and graph compute the same thing
# (set either to "0" to check the other forms instead)
os.environ.setdefault("LYCO_FACTOR_KERNELS", "1")
os.environ.setdefault("LYCO_BYPASS_OP", "1")
os.environ.setdefault("LYCO_BYPASS_STREAMS", "1")
os.environ.setdefault("LYCO_SIDE_SPLIT", "1")
os.environ.setdefault("LYCO_MERGE_AHEAD", "1")
os.environ.setdefault("LYCO_MERGE_KERNEL", "1")
os.environ.setdefault("LYCO_MERGE_TAPS", "1")
os.environ.setdefault("LYCO_CONV_EPILOGUE", "1")
os.environ.setdefault("LYCO_CONV_NHWC", "1")
os.environ.setdefault("LYCO_CONV_WEIGHT_CL", "1")
os.environ.setdefault("LYCO_DGRAD_WEIGHT_CL", "1")
os.environ.setdefault("LYCO_TAPS_DOWN", "1")
os.environ.setdefault("LYCO_CONV_DOWN_IM2COL", "1")
os.environ.setdefault("LYCO_ACC_CL", "1")
os.environ.setdefault("LYCO_WGRAD_KERNEL", "1")
os.environ.setdefault("LYCO_SHARED_INPUT", "1")
os.environ.setdefault("LYCO_FUSED_GEMM", "1")
os.environ.setdefault("LYCO_FORWARD_MERGED", "1")
os.environ.setdefault("LYCO_LATE_JOIN", "1")
os.environ.setdefault("LYCO_IA3_KEEP_OUTPUT", "1")
os.environ.setdefault("LYCO_IA3_ROWS_KERNEL", "1")
os.environ.setdefault("LYCO_IA3_GEGLU_SUMS", "1")
os.environ.setdefault("LYCO_IA3_KEEP_OUTPUT_CONV", "1")
os.environ.setdefault("LYCO_IA3_SCALE_OUTPUT", "1")
os.environ.setdefault("LYCO_OFT_KEEP_OUTPUT", "1")
os.environ.setdefault("LYCO_OFT_KERNELS", "1")
os.environ.setdefault("LYCO_GEGLU_FUSE", "1")
os.environ.setdefault("LYCO_INPUT_REGEN", "1")
os.environ.setdefault("LYCO_REGEN_KERNEL", "1")
os.environ.setdefault("LYCO_NORM_REGEN_MIN", "0")  # every norm output regenerated, whatever its size (regen.norm_regen_min)
os.environ.setdefault("LYCO_FORWARD_SIDE", "1")  # eager: only where the backward shares the thread (lowrank._forward_side)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lyco.formats.safetensors_io import load_tensors  # noqa: E402
from lyco.train import from_dict  # noqa: E402
from lyco.train.loop import Trainer  # noqa: E402
from lyco.train.synthetic import make_shapes  # noqa: E402

#: --clear-batches (main sets it)
CLEAR_BATCHES = [False]

# name: (network table, train table additions)
CASES = {
    "lora": ({"algo": "lora", "rank": 8}, {}),
    "lora-rank-dropout": ({"algo": "lora", "rank": 8, "options": {"rank_dropout": 0.2}}, {}),
    "lora-accum2": ({"algo": "lora", "rank": 8}, {"gradient_accumulation_steps": 2}),
    "lora-fp16": ({"algo": "lora", "rank": 8}, {"mixed_precision": "fp16"}),
    "lora-ckpt": ({"algo": "lora", "rank": 8}, {"gradient_checkpointing": True}),
    "locon": ({"algo": "lora", "rank": 8, "preset": "full", "conv_rank": 4}, {}),
    "loha": ({"algo": "loha", "rank": 4}, {}),
    "lokr": ({"algo": "lokr", "rank": 4, "options": {"factor": 4}}, {}),
    "dora": ({"algo": "lora", "rank": 8, "dora": True}, {}),
    "diag-oft": ({"algo": "diag-oft", "rank": 4}, {}),
    "boft": ({"algo": "boft", "rank": 4}, {}),
    "glora": ({"algo": "glora", "rank": 4}, {}),
    "ia3": ({"algo": "ia3"}, {}),
    "full": ({"algo": "full"}, {}),
    # the rebuilt op (DoRA, (IA)³, GLoRA, BOFT, Full under mode=auto) with autocast fp16 and with
    # gradient checkpointing (its forward re-run inside the backward)
    "dora-fp16": ({"algo": "lora", "rank": 8, "dora": True}, {"mixed_precision": "fp16"}),
    "dora-ckpt": ({"algo": "lora", "rank": 8, "dora": True}, {"gradient_checkpointing": True}),
    "ia3-fp16": ({"algo": "ia3"}, {"mixed_precision": "fp16"}),
    "lora-te": ({"algo": "lora", "rank": 4, "train_text_encoder": True}, {}),
    # LoKr on the rebuilt op under mode=auto (own Kronecker backward), with fp16 autocast and with
    # gradient checkpointing; the low-rank rebuild op (algorithms/lowrank.py) under mode=rebuild
    "lokr-fp16": ({"algo": "lokr", "rank": 4, "options": {"factor": 4}}, {"mixed_precision": "fp16"}),
    # rank 2 factor 4: the 32-wide layers get a low-rank W2, trained as a LoRA (lokr.py: _kron_lora)
    "lokr-lowrank": ({"algo": "lokr", "rank": 2, "options": {"factor": 4}}, {}),
    "lokr-lowrank-ckpt": ({"algo": "lokr", "rank": 2, "options": {"factor": 4}}, {"gradient_checkpointing": True}),
    "lokr-ckpt": ({"algo": "lokr", "rank": 4, "options": {"factor": 4}}, {"gradient_checkpointing": True}),
    # both factors full on every layer: the rebuilt op with its Triton merge and weight-gradient kernels, and in
    # captured steps a k×k conv with few positions per weight as the op's LoRA form (lokr.py: _eye_form; with
    # LYCO_LOKR_EYE_POSITIONS large, every k×k conv)
    "lokr-full": ({"algo": "lokr", "rank": 4, "preset": "full", "options": {"factor": 4, "full_matrix": True}}, {}),
    "lokr-full-ckpt": ({"algo": "lokr", "rank": 4, "preset": "full", "options": {"factor": 4, "full_matrix": True}},
                       {"gradient_checkpointing": True}),
    "lokr-full-fp16": ({"algo": "lokr", "rank": 4, "preset": "full", "options": {"factor": 4, "full_matrix": True}},
                       {"mixed_precision": "fp16"}),
    # GLoRA through the bypass op in captured steps (glora.py: GLoRA.bypass_op), with fp16 autocast
    "glora-fp16": ({"algo": "glora", "rank": 4}, {"mixed_precision": "fp16"}),
    "lora-rebuild": ({"algo": "lora", "rank": 8, "mode": "rebuild"}, {}),
    "locon-rebuild": ({"algo": "lora", "rank": 8, "preset": "full", "conv_rank": 4, "mode": "rebuild"}, {}),
    "loha-rebuild": ({"algo": "loha", "rank": 4, "mode": "rebuild"}, {}),
    # Diag-OFT on the rebuilt op (own backward, Cayley inverse kept) with fp16 autocast and with
    # gradient checkpointing
    "diag-oft-fp16": ({"algo": "diag-oft", "rank": 4}, {"mixed_precision": "fp16"}),
    "diag-oft-ckpt": ({"algo": "diag-oft", "rank": 4}, {"gradient_checkpointing": True}),
    # blocks of 16 where a layer allows (the output-keeping op's Triton kernels take 16 to 64) under fp16 autocast:
    # with LYCO_OFT_KEEP_OUTPUT_MIN_IN=0 the tiny model's q/k/v and GEGLU projections (a norm's fp32 output) keep
    # their output as the bf16 model does (issue 7, session 30)
    "diag-oft-b16-fp16": ({"algo": "diag-oft", "rank": 16}, {"mixed_precision": "fp16"}),
    # the fixed-batch evaluation runs eager forward passes before the first capture and between replays
    "lora-eval": ({"algo": "lora", "rank": 8}, {"_eval": {"enabled": True, "num_images": 2, "every_n_steps": 2}}),
}


def config(data: Path, out: Path, net: dict, train: dict, graph: bool, steps: int):
    return from_dict({
        "model": {"path": "tiny:sd1"},
        "data": {"train_dir": str(data), "resolution": [64, 64], "bucket_reso_steps": 32, "min_bucket_reso": 32,
                 "max_bucket_reso": 128, "cache_dir": str(out.parent / "cache")},
        "network": {"train_text_encoder": False, **net},
        "optimizer": {"learning_rate": 1e-3},
        "train": {"max_train_steps": steps, "batch_size": 4, "mixed_precision": "bf16", "cuda_graph": graph,
                  **{k: v for k, v in train.items() if not k.startswith("_")}},
        "output": {"output_dir": str(out), "progress_bar": False, "log_with": "none", "save_dtype": "fp32",
                   "save_state": False},
        "eval": {"enabled": False, **train.get("_eval", {})},
    })


def first_gradients(data: Path, out: Path, net: dict, train: dict, graph: bool) -> torch.Tensor:
    """All adapter gradients (one flat fp64 vector) of the first micro-batch, before any update: unlike
    the adapters after many Adam steps, this does not amplify rounding noise (Adam's first steps move
    every element by ~lr whatever the size of its gradient)."""
    tr = Trainer(config(data, out, net, train, graph, 1)).setup()
    batch = next(iter(tr.dataloader))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    inp = tr.loss_inputs(tr._latents_of(batch), batch["captions"], batch["time_ids"], gen, is_reg=batch["is_reg"])
    if graph:
        tr._graph(inp)
    else:
        tr.accelerator.backward(tr.loss_of(tr.model, inp))
    params = [p for p in tr.network.parameters() if p.requires_grad]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten() for p in params])


def moved_gradients(data: Path, out: Path, net: dict, train: dict) -> float:
    """Relative L2 between the graph's and eager's gradients *after the parameters moved*: every adapter
    tensor is perturbed (so LoRA's zero-initialised factors no longer hide a path), the step is captured
    and replayed once, the parameters are moved again in place (as an optimizer step does), and the
    replayed gradients are compared with an eager backward at the same parameters and inputs. A graph
    that read a stale copy of anything would differ here at once."""
    tr = Trainer(config(data, out, net, train, True, 1)).setup()
    batch = next(iter(tr.dataloader))
    gen = torch.Generator().manual_seed(0)
    inp = tr.loss_inputs(tr._latents_of(batch), batch["captions"], batch["time_ids"], gen, is_reg=batch["is_reg"])
    params = [p for p in tr.network.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)

    def move():
        with torch.no_grad():
            for p in params:
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p))

    def grads():
        v = torch.cat([p.grad.double().flatten() for p in params])
        for p in params:
            p.grad.zero_()
        return v

    move()
    torch.manual_seed(0)
    tr._graph(inp)
    grads()
    move()
    torch.manual_seed(0)
    tr._graph(inp)
    gg = grads()
    torch.manual_seed(0)
    tr.accelerator.backward(tr.loss_of(tr.model, inp))
    ge = grads()
    assert tr._graph.replays == 2 and tr._graph.disabled_reason is None, tr._graph.disabled_reason
    return float((ge - gg).norm() / ge.norm().clamp_min(1e-30))


def run(data: Path, out: Path, net: dict, train: dict, graph: bool, steps: int):
    if CLEAR_BATCHES[0]:
        from lyco.algorithms import factor_batch
        factor_batch._BATCHES.clear()
    tr = Trainer(config(data, out, net, train, graph, steps)).setup()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = tr.train()
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    g = tr._graph
    info = {"s_per_step": sec / steps, "losses": [v for _, v in res.losses]}
    if g is not None:
        info.update(captures=g.captures, replays=g.replays, eager_calls=g.eager_calls,
                    retried=getattr(g, "retried", 0), disabled_reason=g.disabled_reason,
                    memsets_replaced=getattr(g, "memsets_replaced", 0))
    return load_tensors(res.adapter_path)[0], info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="check_cuda_graph_out")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--eager-twice", action="store_true", help="also train eager a second time (noise reference)")
    ap.add_argument("--one-bucket", action="store_true", help="square images only (one graph)")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest relative L2 difference of the gradients")
    ap.add_argument("--no-retry", action="store_true", help="a failed capture is not tried again (counts failures)")
    ap.add_argument("--clear-batches", action="store_true",
                    help="forget factor_batch's batches before each trainer (an experiment on the capture failures)")
    a = ap.parse_args()
    CLEAR_BATCHES[0] = a.clear_batches
    if a.no_retry:
        from lyco.train.graphs import GraphedStep
        GraphedStep.capture_retries = 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    os.makedirs(a.out, exist_ok=True)
    base = Path(tempfile.mkdtemp())
    data = base / "train"
    make_shapes(data / "4_lycoshape", 8, seed=3, sizes=((64, 64),) if a.one_bucket else ((64, 64), (128, 64)))
    rows, bad = [], 0
    for rep, name in enumerate(a.cases.split(",")):
        net, train = CASES[name]
        row = {"case": name}
        work = base / str(rep)  # a case may be named more than once (repeats: the capture's intermittent failure)
        try:
            ea, ei = run(data, work / f"{name}-eager", net, train, False, a.steps)
            ga, gi = run(data, work / f"{name}-graph", net, train, True, a.steps)
            el, gl = ei.pop("losses"), gi.pop("losses")
            row["first_differing_step"] = next((i + 1 for i, (x, y) in enumerate(zip(el, gl)) if x != y), None)
            if a.eager_twice:  # the run-to-run noise of eager mode itself (non-deterministic GPU kernels)
                e2, _ = run(data, work / f"{name}-eager2", net, train, False, a.steps)
                row["eager_twice_rel_l2"] = max(float((ea[k].double() - e2[k].double()).norm()
                                                      / ea[k].double().norm().clamp_min(1e-30)) for k in ea)
            ge = first_gradients(data, work / f"{name}-g-eager", net, train, False)
            gg = first_gradients(data, work / f"{name}-g-graph", net, train, True)
            row["first_grad_rel_l2"] = float((ge - gg).norm() / ge.norm().clamp_min(1e-30))
            row["moved_grad_rel_l2"] = moved_gradients(data, work / f"{name}-moved", net, train)
            worst_rel = worst_abs = 0.0
            for k in ea:
                x, y = ea[k].double(), ga[k].double()
                worst_abs = max(worst_abs, float((x - y).abs().max()))
                worst_rel = max(worst_rel, float((x - y).norm() / x.norm().clamp_min(1e-30)))
            # pass: the gradients agree within tol (the adapters after many steps are reported too;
            # they are bit-identical wherever the graph replays exactly the eager kernels)
            # each compared on its own: max() of a NaN and a number depends on their order, and NaN <= tol is False
            finite = all(bool(torch.isfinite(t).all()) for t in list(ea.values()) + list(ga.values()))
            ok = (all(row[k] <= a.tol for k in ("first_grad_rel_l2", "moved_grad_rel_l2")) and finite
                  and gi.get("captures", 0) >= 1 and gi.get("disabled_reason") is None)
            row.update(ok=ok, adapters_finite=finite, rel_l2=worst_rel, max_abs=worst_abs, eager_s_per_step=ei["s_per_step"],
                       graph_s_per_step=gi["s_per_step"], **{k: v for k, v in gi.items() if k != "s_per_step"})
        except Exception as e:  # noqa: BLE001 — report and go on with the next case
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        bad += not row["ok"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(a.out, "check_cuda_graph.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": a.steps,
                       "tol": a.tol, "rows": rows}, f, indent=1)
    print(f"{len(rows) - bad}/{len(rows)} cases ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
