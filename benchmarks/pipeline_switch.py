"""Adapter switching in a diffusers pipeline: lyco vs diffusers' own LoRA API, same LoRA files.

    .venv/bin/python benchmarks/pipeline_switch.py [--families sd1 sdxl] [--reps 5] [--threads 2]
                                                   [--device cuda] [--out PATH]

For an SD1.5-sized and an SDXL-sized pipeline (UNet and text encoder(s) built from the real configs
in ``lyco.models.configs``, random fp16 weights on CPU; a tiny VAE stands in for the real one, which
neither library touches), two rank-16 kohya LoRA files are made on kohya's default targets
(``attn-mlp``: transformer blocks of the UNet, CLIP attention and MLP) with random non-zero factors,
saved in fp16. Then, in the same process, on the same pipeline object:

* **load + attach** one file: ``lyco.pipeline.load`` vs ``pipe.load_lora_weights`` (default
  arguments, and ``low_cpu_mem_usage=True``), each from a clean pipeline (removed / unloaded after
  every repetition, not timed);
* **switch** between the two loaded adapters: lyco ``disable(a)``+``enable(b)`` vs diffusers
  ``set_adapters([b], [1.0])`` (alternating a ↔ b);
* **fuse** / **unfuse** one adapter: lyco ``fuse()``/``unfuse()`` (exact, snapshot-based) vs
  ``fuse_lora(adapter_names=[a])``/``unfuse_lora()``; and a fused switch a → b (unfuse, select,
  fuse).

Each number is the median of several repetitions; lyco and diffusers phases alternate (rounds) so
that load changes on a shared machine hit both alike. Wall and CPU (process) times are both
recorded. A check compares the fused weights of both libraries (they must agree: same work done)
and the weights after unfusing with the originals. Results go to
``benchmarks/results/pipeline_switch.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

from _common import cpu_name, loadavg, machine_info, mem_available_gb  # noqa: E402  (benchmarks/)


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------


def build_pipeline(family: str, seed: int = 0):
    """Real-config UNet + text encoder(s) with random fp16 weights; tiny VAE and tokenizers."""
    from lyco.models import configs as C
    from lyco.models.tiny import tiny_components, tiny_tokenizer

    comps = {}
    g = torch.Generator().manual_seed(seed)
    for comp in C.COMPONENTS[family]:
        if comp == "vae":
            continue
        m = C.build_from_config(C.get_config(family, comp), device="meta")
        m = m.to_empty(device="cpu").to(torch.float16)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() >= 2:  # drawn in fp32 (fp16 normal_ on CPU is very slow), cast once
                    std = 1.0 / max(1, p[0].numel()) ** 0.5
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std))
                elif name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            for b in m.buffers():  # e.g. CLIP position ids: keep them valid
                if not b.is_floating_point():
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        comps[comp] = m.eval()
    comps["vae"] = tiny_components(family, seed, torch.float16, with_vae=True)["vae"]
    tok = tiny_tokenizer()
    return C.assemble_pipeline(family, comps, C.build_scheduler(family), tok, tok if family == "sdxl" else None)


def make_lora(pipe, path: Path, seed: int) -> int:
    import lyco
    net = lyco.create(pipe, algo="lora", rank=16, alpha=8.0, preset="attn-mlp", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers.values():
            for p in layer.params.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    n = len(net.layers)
    net.save(str(path), dtype="fp16")
    net.detach()
    del net
    gc.collect()
    return n


def _weights(pipe):
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, comp, None)
        if m is not None:
            out.update({f"{comp}.{k}": v for k, v in m.state_dict().items() if k.endswith("weight")})
    return out


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timer:
    def __init__(self):
        self.samples: dict[str, dict[str, list[float]]] = {}

    def time(self, key: str, fn, *args, **kw):
        gc.collect()
        _sync()
        w0, c0 = time.perf_counter(), time.process_time()
        r = fn(*args, **kw)
        _sync()
        w1, c1 = time.perf_counter(), time.process_time()
        d = self.samples.setdefault(key, {"wall": [], "cpu": []})
        d["wall"].append(w1 - w0)
        d["cpu"].append(c1 - c0)
        return r

    def median(self, key: str, kind: str = "wall") -> float:
        return statistics.median(self.samples[key][kind])


def lyco_round(pipe, fa: Path, fb: Path, t: Timer, reps: int, switches: int, fuse_reps: int) -> None:
    import lyco.pipeline as lp
    reg = lp.adapters(pipe)
    for _ in range(reps):
        t.time("lyco/load", lp.load, pipe, fa, 1.0, name="a")
        reg.remove("a")
    lp.load(pipe, fa, 1.0, name="a")
    lp.load(pipe, fb, 1.0, name="b", enabled=False)
    cur = "a"
    for _ in range(switches):
        nxt = "b" if cur == "a" else "a"

        def switch(cur=cur, nxt=nxt):
            reg.disable(cur)
            reg.enable(nxt)
        t.time("lyco/switch", switch)
        cur = nxt
    if cur != "a":
        reg.disable(cur)
        reg.enable("a")
    for _ in range(fuse_reps):
        t.time("lyco/fuse", reg.fuse)
        t.time("lyco/unfuse", reg.unfuse)
    reg.fuse()
    cur = "a"
    for _ in range(fuse_reps):
        nxt = "b" if cur == "a" else "a"

        def fused_switch(cur=cur, nxt=nxt):
            reg.unfuse()
            reg.disable(cur)
            reg.enable(nxt)
            reg.fuse()
        t.time("lyco/fused_switch", fused_switch)
        cur = nxt
    reg.unfuse()
    reg.clear()


def diffusers_round(pipe, fa: Path, fb: Path, t: Timer, reps: int, switches: int, fuse_reps: int) -> None:
    for _ in range(reps):
        t.time("diffusers/load", pipe.load_lora_weights, str(fa), adapter_name="a")
        pipe.unload_lora_weights()
        t.time("diffusers/load_lowmem", pipe.load_lora_weights, str(fa), adapter_name="a", low_cpu_mem_usage=True)
        pipe.unload_lora_weights()
    pipe.load_lora_weights(str(fa), adapter_name="a")
    pipe.load_lora_weights(str(fb), adapter_name="b")
    cur = "a"
    for _ in range(switches):
        nxt = "b" if cur == "a" else "a"
        t.time("diffusers/switch", pipe.set_adapters, [nxt], [1.0])
        cur = nxt
    pipe.set_adapters(["a"], [1.0])
    for _ in range(fuse_reps):
        t.time("diffusers/fuse", pipe.fuse_lora, adapter_names=["a"])
        t.time("diffusers/unfuse", pipe.unfuse_lora)
    pipe.fuse_lora(adapter_names=["a"])
    cur = "a"
    for _ in range(fuse_reps):
        nxt = "b" if cur == "a" else "a"

        def fused_switch(nxt=nxt):
            pipe.unfuse_lora()
            pipe.set_adapters([nxt], [1.0])
            pipe.fuse_lora(adapter_names=[nxt])
        t.time("diffusers/fused_switch", fused_switch)
        cur = nxt
    pipe.unfuse_lora()
    pipe.unload_lora_weights()


def _fingerprint(t: torch.Tensor) -> tuple[int, int]:
    """An integer fingerprint of a tensor's bits (sum and weighted sum of its 16-bit words)."""
    v = t.detach().reshape(-1).view(torch.int16).to(torch.int64)
    return int(v.sum()), int((v * torch.arange(1, v.numel() + 1, dtype=torch.int64).remainder_(65521)).sum())


def check_same_work(pipe, fa: Path, every: int = 8) -> dict:
    """Fused weights of lyco and diffusers agree (every ``every``-th targeted weight compared in
    full); after unfusing, every targeted weight's bits are checked against its original
    (fingerprints: the originals are not all kept, an SDXL copy would not fit in memory)."""
    import lyco.pipeline as lp
    e = lp.load(pipe, fa, 1.0, name="a")
    mods = [layer.host.module for layer in e.network.layers.values()]
    sample = mods[::every]
    orig_fp = [_fingerprint(m.weight) for m in mods]
    orig = [m.weight.detach().clone() for m in sample]
    lp.fuse(pipe)
    ours = [m.weight.detach().clone() for m in sample]
    changed = sum(1 for m, fp in zip(mods, orig_fp) if _fingerprint(m.weight) != fp)
    lp.unfuse(pipe)
    lyco_exact = all(_fingerprint(m.weight) == fp for m, fp in zip(mods, orig_fp))
    lp.remove(pipe, "a")
    pipe.load_lora_weights(str(fa), adapter_name="a")
    pipe.fuse_lora(adapter_names=["a"])
    max_rel = 0.0
    for m, w0, w1 in zip(sample, orig, ours):  # PEFT wraps the module; the weight object stays the same
        theirs = m.weight.float()
        max_rel = max(max_rel, float((w1.float() - theirs).abs().max() / (w1.float() - w0.float()).abs().max()
                                     .clamp_min(1e-12)))
    pipe.unfuse_lora()
    diff_changed = sum(1 for m, fp in zip(mods, orig_fp) if _fingerprint(m.weight) != fp)
    diff_max = max(float((m.weight.float() - w0.float()).abs().max()) for m, w0 in zip(sample, orig))
    pipe.unload_lora_weights()
    return {"lyco_changed_weights": changed, "diffusers_weights_matched": len(sample),
            "max_fused_difference_relative_to_delta": max_rel, "lyco_unfuse_bit_exact": lyco_exact,
            "diffusers_unfuse_changed_weights": diff_changed, "diffusers_unfuse_max_abs_error": diff_max}


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

OPS = [("load", "load + attach one LoRA"), ("switch", "switch a ↔ b (both loaded)"),
       ("fuse", "fuse one LoRA"), ("unfuse", "unfuse"), ("fused_switch", "fused switch a → b")]


def run_family(family: str, reps: int, switches: int, workdir: Path, device: str = "cpu", fuse_reps: int = 2,
               rounds: int = 2) -> dict:
    import diffusers  # noqa: F401
    t0 = time.perf_counter()
    pipe = build_pipeline(family).to(device)
    n_params = sum(p.numel() for c in ("unet", "text_encoder", "text_encoder_2")
                   if getattr(pipe, c, None) is not None for p in getattr(pipe, c).parameters())
    build_s = time.perf_counter() - t0
    print(f"[{family}] built in {build_s:.0f} s; RSS {rss_gb():.1f} GB", flush=True)
    fa, fb = workdir / f"{family}_a.safetensors", workdir / f"{family}_b.safetensors"
    n_mod = make_lora(pipe, fa, 1)
    make_lora(pipe, fb, 2)
    print(f"[{family}] pipeline {n_params / 1e9:.2f} B params fp16 (built in {build_s:.0f} s), LoRA rank 16: "
          f"{n_mod} modules, {fa.stat().st_size / 2**20:.1f} MiB; RSS {rss_gb():.1f} GB", flush=True)
    # warm-up (imports, page cache, first-call overheads) for both, not timed
    scratch = Timer()
    lyco_round(pipe, fa, fb, scratch, 1, 2, 0)
    diffusers_round(pipe, fa, fb, scratch, 1, 2, 0)
    print(f"[{family}] warm-up done", flush=True)
    t = Timer()
    for r in range(rounds):
        lyco_round(pipe, fa, fb, t, reps, switches, fuse_reps)
        diffusers_round(pipe, fa, fb, t, reps, switches, fuse_reps)
        print(f"[{family}] round {r + 1}/{rounds} done; RSS {rss_gb():.1f} GB, load {loadavg()}", flush=True)
    check = check_same_work(pipe, fa)
    res = {"family": family, "params": n_params, "lora_modules": n_mod, "lora_mib": fa.stat().st_size / 2**20,
           "check": check, "ops": {}}
    for op, label in OPS:
        row = {"label": label}
        for kind in ("wall", "cpu"):
            ly = t.median(f"lyco/{op}", kind)
            di = t.median(f"diffusers/{op}", kind)
            row[kind] = {"lyco_s": ly, "diffusers_s": di, "speedup": di / ly if ly > 0 else float("inf")}
            if op == "load":
                dl = t.median("diffusers/load_lowmem", kind)
                row[kind].update({"diffusers_lowmem_s": dl, "speedup_vs_lowmem": dl / ly if ly > 0 else float("inf")})
        row["samples"] = {"lyco": len(t.samples[f"lyco/{op}"]["wall"]),
                          "diffusers": len(t.samples[f"diffusers/{op}"]["wall"])}
        res["ops"][op] = row
    del pipe
    gc.collect()
    return res


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def write_md(data: dict, path: Path) -> None:
    L = []
    m = data["machine"]
    L.append("# Adapter switching in a diffusers pipeline: lyco vs diffusers\n")
    L.append(f"Machine: **{m['cpu']}**, {m['cpus']} usable CPUs, {m['torch_threads']} torch threads; pipeline on "
             f"**{m.get('device', 'cpu')}**; torch "
             f"{m['torch']}, diffusers {m['diffusers']}, peft {m['peft']}, Python {m['python']}. Load average "
             f"at start {m['load_start']}, at end {m['load_end']} (shared machine: wall times include waiting "
             f"for a core; CPU times do not).\n")
    L.append("Pipelines from the real configs with random fp16 weights (UNet + text encoder(s); a tiny "
             "VAE stands in, untouched by both). Two rank-16 kohya LoRA files per model (alpha 8, kohya's "
             "default targets, fp16), the same files for both libraries, the same pipeline object, the same "
             "process. Median of the repetitions; ratio = diffusers time / lyco time.\n")
    for fam in data["families"]:
        L.append(f"## {fam['family'].upper()} ({fam['params'] / 1e9:.2f} B parameters, LoRA: {fam['lora_modules']} "
                 f"modules, {fam['lora_mib']:.1f} MiB)\n")
        L.append("| operation | lyco ms | diffusers ms | × faster (wall) | lyco CPU ms | diffusers CPU ms | × faster (CPU) | runs |")
        L.append("|---|---|---|---|---|---|---|---|")
        for op, row in fam["ops"].items():
            w, c = row["wall"], row["cpu"]
            L.append(f"| {row['label']} | {fmt_ms(w['lyco_s'])} | {fmt_ms(w['diffusers_s'])} | "
                     f"**{w['speedup']:.1f}×** | {fmt_ms(c['lyco_s'])} | {fmt_ms(c['diffusers_s'])} | {c['speedup']:.1f}× | "
                     f"{row['samples']['lyco']} |")
            if op == "load":
                L.append(f"| load, diffusers `low_cpu_mem_usage=True` | {fmt_ms(w['lyco_s'])} | "
                         f"{fmt_ms(w['diffusers_lowmem_s'])} | **{w['speedup_vs_lowmem']:.1f}×** | {fmt_ms(c['lyco_s'])} | "
                         f"{fmt_ms(c['diffusers_lowmem_s'])} | {c['speedup_vs_lowmem']:.1f}× | {row['samples']['lyco']} |")
        ck = fam["check"]
        L.append("")
        L.append(f"Check: lyco's fuse changes {ck['lyco_changed_weights']} weights; on {ck['diffusers_weights_matched']} "
                 f"of them (every 8th) the two libraries' fused weights differ by at most "
                 f"{ck['max_fused_difference_relative_to_delta']:.2g} of the largest |ΔW| (fp16 rounding). After "
                 f"unfuse, lyco's weights are bit-identical to the originals: {ck['lyco_unfuse_bit_exact']}; "
                 f"diffusers leaves {ck['diffusers_unfuse_changed_weights']} of them changed (max abs error on the "
                 f"compared ones {ck['diffusers_unfuse_max_abs_error']:.2g}).\n")
    L.append("What is timed: *load + attach* = read the file, decode, attach to UNet and text encoder(s) "
             "(lyco `lyco.pipeline.load`; diffusers `load_lora_weights`, from a pipeline without adapters). "
             "*switch* = make the other loaded adapter the active one (lyco `disable`+`enable`; diffusers "
             "`set_adapters`). *fuse*/*unfuse* = bake one adapter into the weights and take it out again "
             "(lyco: exact, from a snapshot; diffusers: `fuse_lora`/`unfuse_lora`, W ± ΔW). *fused switch* = "
             "unfuse, select the other adapter, fuse.\n")
    other = path.with_name(path.stem + "_cuda.md")
    if other.exists() and other != path:
        L.append(f"The same benchmark with the pipeline on a GPU is in `{other.name}`.\n")
    L.append("Reproduce: `.venv/bin/python benchmarks/pipeline_switch.py` (`--device cuda` for a GPU).")
    path.write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--reps", type=int, default=3, help="load repetitions per round")
    ap.add_argument("--fuse-reps", type=int, default=2, help="fuse/unfuse and fused-switch repetitions per round")
    ap.add_argument("--switches", type=int, default=20, help="switches per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating lyco/diffusers rounds")
    ap.add_argument("--sdxl-cpu-rounds", type=int, default=1,
                    help="rounds for SDXL on CPU (each fuse there takes tens of seconds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the pipeline lives")
    ap.add_argument("--out", default=str(RESULTS / "pipeline_switch"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    from lyco._quiet import quiet_libraries
    quiet_libraries(loggers=("peft",))
    need = {"sd1": 6, "sd2": 6, "sdxl": 14}
    avail = mem_available_gb()
    print(f"memory available: {avail:.1f} GB; CPU {cpu_name()}, {os.cpu_count()} CPUs, load {loadavg()}", flush=True)
    machine = {**machine_info("cpu", cpus="usable_cpus", torch_threads="torch_threads", torch="torch",
                              diffusers="diffusers", peft="peft", python="python", load_start="loadavg"),
               "mem_available_gb": round(avail, 1),
               "device": a.device if a.device == "cpu" else f"{a.device} ({torch.cuda.get_device_name()})"}
    fams = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as wd:
        for fam in a.families:
            if a.device == "cpu" and mem_available_gb() < need[fam]:
                print(f"[{fam}] skipped: {mem_available_gb():.1f} GB available, about {need[fam]} GB needed", flush=True)
                continue
            rounds = a.sdxl_cpu_rounds if (fam == "sdxl" and a.device == "cpu") else a.rounds
            fams.append(run_family(fam, a.reps, a.switches, Path(wd), a.device, a.fuse_reps, rounds))
            r = fams[-1]
            for op, row in r["ops"].items():
                w = row["wall"]
                extra = f", vs low_cpu_mem_usage {w['speedup_vs_lowmem']:.1f}×" if op == "load" else ""
                print(f"[{fam}] {row['label']:<28} lyco {fmt_ms(w['lyco_s']):>8} ms  diffusers "
                      f"{fmt_ms(w['diffusers_s']):>8} ms  → {w['speedup']:.1f}× (CPU {row['cpu']['speedup']:.1f}×){extra}",
                      flush=True)
            print(f"[{fam}] check: {r['check']}", flush=True)
            _write(a, machine, fams)  # after each family: a later failure keeps what was measured
    _write(a, machine, fams)
    return 0


def _write(a, machine: dict, fams: list) -> None:
    machine["load_end"] = loadavg()
    data = {"machine": machine, "families": fams,
            "settings": {"reps": a.reps, "fuse_reps": a.fuse_reps, "switches": a.switches, "rounds": a.rounds,
                         "sdxl_cpu_rounds": a.sdxl_cpu_rounds}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".md"):
        p = out.with_suffix(suffix)
        if p.exists() and not os.access(p, os.W_OK):
            p.unlink()
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    write_md(data, out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
