"""CPU speed and memory of ``lyco merge`` and ``lyco extract`` on an SD1.5-sized checkpoint.

    .venv/bin/python benchmarks/tools_cpu.py [--workdir /tmp] [--keep]

1. Builds a single-file SD1.5 checkpoint from the real configs (UNet, VAE, CLIP-L; LDM key layout)
   with random fp16 weights, written tensor by tensor (~2.1 GB), in a temporary folder.
2. Makes a rank-16 LoRA (alpha 16) on kohya's default targets (transformer blocks of the UNet,
   CLIP attention and MLP) with random non-zero factors.
3. Times ``lyco.tools.merge`` (checkpoint + LoRA → new single file) and ``lyco.tools.extract``
   (base vs merged → rank-16 LoRA), each in a fresh subprocess that reports its wall time, CPU time
   and peak resident memory (``ru_maxrss``) next to the resident memory after the imports.
4. Writes ``benchmarks/results/tools_cpu.json`` and ``.md`` naming the CPU, and prints the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

from _common import loadavg, machine_info  # noqa: E402  (benchmarks/)


def build_checkpoint(path: Path, seed: int = 0) -> dict:
    """A random fp16 SD1.5 single file, streamed (one tensor in memory at a time)."""
    from lyco.formats.checkpoint import canonical_state_dict, single_file_layout, to_file_ref
    from lyco.models.configs import build_components
    from lyco.tools._common import StreamWriter

    comps = build_components("sd1", device="meta")
    layout = single_file_layout("sd1")
    entries, plan = [], []
    for comp in ("unet", "vae", "text_encoder"):
        for name, t in canonical_state_dict(comps[comp], comp).items():
            ref = to_file_ref(name, layout)
            shape = tuple(t.shape)
            if ref.conv1x1 and len(shape) == 2:
                shape = shape + (1, 1)
            if ref.transpose:
                shape = shape[::-1]
            dt = torch.float16 if t.is_floating_point() else t.dtype
            entries.append((ref.key, dt, shape))
            plan.append((ref.key, name, dt, shape))
    g = torch.Generator().manual_seed(seed)
    largest = max(math.prod(s) * torch.empty((), dtype=d).element_size() for _, d, s in entries)
    params = 0
    with StreamWriter(path, entries, {"format": "pt"}) as w:
        for key, name, dt, shape in plan:
            if not dt.is_floating_point:
                n = shape[-1] if shape else 1
                t = torch.arange(n, dtype=dt).expand(shape).contiguous()
            elif len(shape) >= 2:
                t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
            elif name.endswith("weight"):
                t = 1.0 + 0.05 * torch.randn(shape, generator=g)
            else:
                t = 0.05 * torch.randn(shape, generator=g)
            params += t.numel()
            w.write(key, t.to(dt))
    return {"tensors": len(entries), "parameters": params, "largest_tensor_bytes": largest}


def build_lora(path: Path, rank: int = 16, seed: int = 1) -> dict:
    """Rank-16 LoRA on kohya's default targets (preset attn-mlp), fp16, random non-zero factors."""
    from lyco import presets
    from lyco.adapter import Adapter, ModuleAdapter
    from lyco.models.configs import build_components
    from lyco.network import select_layers

    comps = build_components("sd1", device="meta", components=["unet", "text_encoder"])
    preset = presets.get("attn-mlp")
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for comp, root in comps.items():
        for _path, canon, _mod, _classes, spec in select_layers(comp, root, preset):
            fin = spec.flat_in
            ones = (1,) * (len(spec.weight_shape) - 2)
            down = torch.randn((rank, spec.in_dim) + spec.kernel, generator=g) / math.sqrt(fin)
            up = torch.randn((spec.out_dim, rank) + ones, generator=g) * 0.02
            mods[f"{comp}.{canon}"] = ModuleAdapter("lora", {"lora_down.weight": down, "lora_up.weight": up,
                                                             "alpha": torch.tensor(float(rank))})
    Adapter(mods, {}, "sd1").save(path, dtype="fp16")
    return {"modules": len(mods), "rank": rank}


_CHILD = r"""
import json, os, resource, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
import torch
import lyco, lyco.tools
from lyco.tools import merge, extract
import diffusers, transformers  # the tools import them lazily; count them in the baseline
from lyco.models import configs
configs.build_unet("sd1")  # warm the lazy imports of the module classes
base_rss = rss()
# ru_maxrss is the peak over the whole process, imports included: reset the kernel's high-water
# mark (VmHWM) so that what is read afterwards is the verb's own peak
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    hwm_reset = True
except OSError:
    hwm_reset = False
def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
import threading
sampled = [0]
stop = threading.Event()
def sampler():
    while not stop.is_set():
        sampled[0] = max(sampled[0], rss())
        stop.wait(0.005)
th = threading.Thread(target=sampler, daemon=True)
th.start()
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
args = json.loads(sys.argv[1])
if args["verb"] == "merge":
    rep = merge(args["base"], [args["lora"]], args["out"], progress=False, verbose=False)
    extra = {"modules": rep["modules"], "tensors_changed": rep["tensors_changed"]}
else:
    res = extract(args["base"], args["tuned"], args["out"], rank=16, progress=False, verbose=False,
                  device="cpu")
    errs = sorted(res.errors.values())
    extra = {"modules": len(res.adapter), "median_rel_error": errs[len(errs) // 2], "max_rel_error": errs[-1]}
wall = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
stop.set(); th.join()
peak = hwm() if hwm_reset else max(sampled[0], base_rss)
print(json.dumps({"wall_s": wall, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                  "baseline_rss_bytes": base_rss, "peak_rss_bytes": peak, "peak_from": "VmHWM" if hwm_reset else "sampled",
                  "sampled_peak_rss_bytes": max(sampled[0], base_rss),
                  "process_peak_rss_bytes": r1.ru_maxrss * 1024,
                  "threads": torch.get_num_threads(), **extra}))
"""


def run_child(args: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"child failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def mb(x: float) -> float:
    return round(x / 2 ** 20, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    a = ap.parse_args()
    free = shutil.disk_usage(a.workdir).free
    if free < 8 * 2 ** 30:
        print(f"need ~8 GiB free in {a.workdir}, found {free / 2 ** 30:.1f} GiB", file=sys.stderr)
        return 1
    d = Path(tempfile.mkdtemp(prefix="lyco_bench_", dir=a.workdir))
    out: dict = {"machine": machine_info("cpu", "logical_cpus", "usable_cpus", "python", "torch",
                                         loadavg_start="loadavg")}
    try:
        t = time.perf_counter()
        ck = build_checkpoint(d / "sd15.safetensors")
        ck["file_bytes"] = (d / "sd15.safetensors").stat().st_size
        ck["build_s"] = round(time.perf_counter() - t, 1)
        lo = build_lora(d / "lora16.safetensors")
        lo["file_bytes"] = (d / "lora16.safetensors").stat().st_size
        out["checkpoint"], out["lora"] = ck, lo
        print(f"checkpoint: {ck['parameters'] / 1e9:.3f} B params, {ck['file_bytes'] / 1e9:.2f} GB fp16 "
              f"(largest tensor {mb(ck['largest_tensor_bytes'])} MiB); LoRA: {lo['modules']} modules, "
              f"{mb(lo['file_bytes'])} MiB", flush=True)
        m = run_child({"verb": "merge", "base": str(d / "sd15.safetensors"), "lora": str(d / "lora16.safetensors"),
                       "out": str(d / "merged.safetensors")})
        print(f"merge:   {m['wall_s']:.1f} s wall, {m['cpu_s']:.1f} s CPU, peak RSS {mb(m['peak_rss_bytes'])} MiB "
              f"(after imports {mb(m['baseline_rss_bytes'])} MiB)", flush=True)
        e = run_child({"verb": "extract", "base": str(d / "sd15.safetensors"), "tuned": str(d / "merged.safetensors"),
                       "out": str(d / "extracted.safetensors")})
        print(f"extract: {e['wall_s']:.1f} s wall, {e['cpu_s']:.1f} s CPU, peak RSS {mb(e['peak_rss_bytes'])} MiB "
              f"(after imports {mb(e['baseline_rss_bytes'])} MiB); median rel. error {e['median_rel_error']:.3g}",
              flush=True)
        out["merge"], out["extract"] = m, e
        out["machine"]["loadavg_end"] = loadavg()
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tools_cpu.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "tools_cpu.md").write_text(_markdown(out))
    print(f"wrote {RESULTS / 'tools_cpu.json'} and .md")
    return 0


def _markdown(r: dict) -> str:
    m, e, ck, lo, mc = r["merge"], r["extract"], r["checkpoint"], r["lora"], r["machine"]
    rows = []
    for name, x in (("merge", m), ("extract", e)):
        rows.append(f"| `lyco {name}` | {x['wall_s']:.1f} | {x['cpu_s']:.1f} | {mb(x['peak_rss_bytes'])} | "
                    f"{mb(x['baseline_rss_bytes'])} | {mb(x['peak_rss_bytes'] - x['baseline_rss_bytes'])} |")
    return f"""# lyco tools on CPU: merge and extract, SD1.5-sized checkpoint

Machine: **{mc['cpu']}**, {mc['usable_cpus']} usable CPUs ({mc['logical_cpus']} logical), torch {mc['torch']},
Python {mc['python']}; {m['threads']} torch threads. Load average at start {mc['loadavg_start']}, at end
{mc.get('loadavg_end')} (the machine is shared: wall times include waiting for a core; CPU time does not).

Checkpoint: random fp16 SD1.5 single file from the real configs (UNet + VAE + CLIP-L, LDM keys),
{ck['parameters'] / 1e9:.3f} B parameters, {ck['file_bytes'] / 1e9:.2f} GB, {ck['tensors']} tensors, largest
tensor {mb(ck['largest_tensor_bytes'])} MiB. LoRA: rank {lo['rank']}, {lo['modules']} modules (kohya's default
targets), fp16, {mb(lo['file_bytes'])} MiB.

| verb | wall s | CPU s | peak RSS MiB | RSS after imports MiB | peak − baseline MiB |
|---|---|---|---|---|---|
{chr(10).join(rows)}

* merge: {m['modules']} modules into {m['tensors_changed']} tensors; untouched tensors are copied as raw bytes.
* extract (rank 16, randomised SVD, base vs merged): {e['modules']} modules, median relative Frobenius error
  {e['median_rel_error']:.3g}, max {e['max_rel_error']:.3g} (the merged file is fp16, so ΔW carries fp16 rounding
  of W + ΔW).
* Each verb runs in a fresh process. "RSS after imports" is its resident memory once torch, diffusers
  and transformers are imported, before the verb runs; "peak RSS" is the kernel's high-water mark
  (VmHWM) reset at that point (`/proc/self/clear_refs`), i.e. the verb's own peak (a 5 ms RSS
  sampler agrees: merge {mb(m['sampled_peak_rss_bytes'])} MiB, extract {mb(e['sampled_peak_rss_bytes'])} MiB).
  The process-lifetime `ru_maxrss` (imports included) was {mb(m['process_peak_rss_bytes'])} / {mb(e['process_peak_rss_bytes'])} MiB.

Reproduce: `.venv/bin/python benchmarks/tools_cpu.py`.
"""


if __name__ == "__main__":
    raise SystemExit(main())
