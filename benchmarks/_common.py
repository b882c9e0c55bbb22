"""What the benchmark scripts share: the facts about the machine they record with their numbers.

:func:`machine_info` gathers them in one place; each script names the facts it records and the JSON
key it records each under (the keys of results already written stay as they were), e.g.
``machine_info("cpu", "torch", load_start="loadavg")``. Only the named facts are gathered, so a
script that does not ask for a GPU name does not initialise CUDA, and one that does not ask for
``diffusers`` does not import it.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what ``platform`` knows, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages ([] where ``/proc/loadavg`` is missing)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def mem_available_gb() -> float:
    """``MemAvailable`` in GiB (NaN where ``/proc/meminfo`` is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def package_version(name: str) -> str | None:
    """A package's version, or None where it is missing or fails to import (``lycoris``: the
    ``lycoris-lora`` distribution, read from its metadata without importing it)."""
    try:
        if name == "lycoris":
            from importlib.metadata import version
            return version("lycoris-lora")
        return __import__(name).__version__
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return None


def _torch():
    import torch
    return torch


def capture_graph(fn, warmup: int = 2):
    """``fn`` (CUDA work) run ``warmup`` times on a side stream, captured as one CUDA graph, replayed once and
    synchronised: the graph, ready to time (the benchmarks' device-time measure without launch overhead)."""
    torch = _torch()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def graph_us(fn, reps_in_graph: int, replays: int = 7) -> float:
    """Median µs of one ``fn()`` call: ``reps_in_graph`` calls captured in one CUDA graph (:func:`capture_graph`),
    the graph replayed ``replays`` times, each timed with CUDA events."""
    def body():
        for _ in range(reps_in_graph):
            fn()
    return replay_us(capture_graph(body), reps_in_graph, replays)


def replay_us(g, reps_in_graph: int, replays: int = 7, warmup: int = 0) -> float:
    """Median µs of one of the ``reps_in_graph`` calls in the instantiated graph ``g``: ``warmup`` untimed replays,
    then ``replays`` replays each timed with CUDA events."""
    torch = _torch()
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0 / reps_in_graph)
    ts.sort()
    return ts[len(ts) // 2]


def shape_table(layers: dict, cfgs: dict, make: Callable, err: Callable, rate: Callable | None = None) -> list:
    """The experiments' per-shape tables (``experiments/kron_wgrad_tiles.py``, ``kron_merge_tiles.py``): per model of
    ``layers`` (``{model: [(rows, in, out, count), …]}``), each distinct ``(in, out)``'s inputs from ``make(inp, out)``
    → ``(args, want, shape)``; each configuration of ``cfgs`` (name → ``fn(*args)``) checked (``err(fn(*args),
    want)``, as ``<name>_err``) and timed (µs a call, 10 calls in one CUDA graph, median of 7 replays: ``<name>_us``;
    ``rate(us, args)`` as ``<name>_tbs`` where given; a configuration that fails is recorded so and its sum is NaN);
    then per model the µs summed over the layers' counts per configuration (ms) and the best per shape. The records,
    each printed as a JSON line as it comes."""
    recs = []
    for model, rows in layers.items():
        counts = {}
        for _, inp, out, n in rows:
            counts[(inp, out)] = counts.get((inp, out), 0) + n
        tot = {name: 0.0 for name in cfgs}
        best = 0.0
        for (inp, out), n in counts.items():
            args, want, shape = make(inp, out)
            rec = dict(model=model, inp=inp, out=out, layers=n, shape=shape)
            for name, fn in cfgs.items():
                try:
                    rec[name + "_err"] = round(err(fn(*args), want), 6)
                    us = graph_us(lambda fn=fn: fn(*args), 10)
                    rec[name + "_us"] = round(us, 2)
                    if rate is not None:
                        rec[name + "_tbs"] = round(rate(us, args), 2)
                    tot[name] += us * n
                except Exception as ex:  # noqa: BLE001 — a configuration Triton cannot compile: recorded
                    rec[name + "_us"] = f"failed: {type(ex).__name__}: {str(ex)[:80]}"
                    tot[name] = float("nan")
            best += n * min(v for k, v in rec.items() if k.endswith("_us") and isinstance(v, float))
            recs.append(rec)
            print(json.dumps(rec), flush=True)
        summary = dict(model=model, summed_ms={k: round(v / 1e3, 3) for k, v in tot.items()},
                       summed_ms_best=round(best / 1e3, 3))
        recs.append(summary)
        print(json.dumps(summary), flush=True)
    return recs


def write_records(path: str | None, recs: list, dev) -> None:
    """An experiment's records as JSON at ``path`` (nothing where it is empty), the device's name beside them."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": _torch().cuda.get_device_name(dev), "records": recs}, f, indent=1)


def _gpu_name() -> str | None:
    torch = _torch()
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


_FACTS: dict[str, Callable[[], Any]] = {
    "cpu": cpu_name,                                     # CPU model
    "logical_cpus": os.cpu_count,                        # CPUs of the machine
    "usable_cpus": lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "torch_threads": lambda: _torch().get_num_threads(),
    "python": platform.python_version,
    "torch": lambda: _torch().__version__,
    "loadavg": loadavg,
    "mem_available_gb": lambda: round(mem_available_gb(), 1),
    "gpu": _gpu_name,                                    # name of CUDA device 0, None without CUDA
}
_PACKAGES = ("diffusers", "peft", "transformers", "triton", "lycoris")


def machine_info(*facts: str, **keyed: str) -> dict[str, Any]:
    """The named machine facts as a dict, in the order given: ``*facts`` under their own names,
    ``key=fact`` under ``key``. Facts: ``cpu``, ``logical_cpus``, ``usable_cpus``,
    ``torch_threads``, ``python``, ``torch``, ``loadavg``, ``mem_available_gb`` (GiB, 1 decimal),
    ``gpu`` and the package versions ``diffusers``, ``peft``, ``transformers``, ``triton``,
    ``lycoris`` (None where missing)."""
    out: dict[str, Any] = {}
    for key, fact in [*((f, f) for f in facts), *keyed.items()]:
        if fact in _FACTS:
            out[key] = _FACTS[fact]()
        elif fact in _PACKAGES:
            out[key] = package_version(fact)
        else:
            raise ValueError(f"unknown machine fact {fact!r}; known: {', '.join([*_FACTS, *_PACKAGES])}")
    return out


class StepClock:
    """A :class:`lyco.train.loop.Trainer` callback that times optimizer steps: on every ``step`` event it stamps
    ``time.perf_counter()``. Steps ``warmup+1 … warmup+steps`` are then timed by :meth:`ms_per_step` (the stamps'
    span ÷ steps) and :meth:`median_ms` (median single step), so that setup, caching and graph capture (the first
    steps) stay out. It does not wait for the device: the trainer announces a step once it has read the step's
    loss from the device, and its step-ahead loop (``Trainer._step_ahead``) does so while the next step already
    runs — a synchronisation here would drain that queue every step and time something the trainer never does.
    Every stamp is taken at the same point of the trainer's cycle, so their span is n steps of it."""

    def __init__(self):
        self.stamps: dict[int, float] = {}

    def __call__(self, trainer, event: str, step: int = 0, **_):
        if event == "step":
            import time
            self.stamps[step] = time.perf_counter()

    def seconds(self, warmup: int, steps: int) -> float:
        return self.stamps[warmup + steps] - self.stamps[warmup]

    def ms_per_step(self, warmup: int, steps: int) -> float:
        return 1000 * self.seconds(warmup, steps) / steps

    def median_ms(self, warmup: int, steps: int) -> float:
        d = sorted(self.stamps[s + 1] - self.stamps[s] for s in range(warmup, warmup + steps))
        return 1000 * d[len(d) // 2]


def summarize_profile(prof, steps: int, wall_ms: float, cuda: bool, top: int = 15) -> dict:
    """A torch.profiler run over ``steps`` steps of ``wall_ms`` each: the kernels that dominate (self device time
    per step), kernel count per step, summed kernel time vs wall time per step (busy fraction: ≪ 1 means the GPU
    idles, waiting for the host), and the top CPU-side ops."""
    avgs = prof.key_averages()

    def dev_self(e):
        for k in ("self_device_time_total", "self_cuda_time_total"):
            v = getattr(e, k, None)
            if v is not None:
                return float(v)
        return 0.0

    kernels, cpu_ops = [], []
    for e in avgs:
        dt = str(getattr(e, "device_type", ""))
        if cuda and dt.endswith("CUDA"):
            kernels.append(e)
        elif not e.key.startswith("ProfilerStep"):
            cpu_ops.append(e)
    k_total = sum(dev_self(e) for e in kernels) / 1e3 / steps
    k_count = sum(e.count for e in kernels) / steps
    kernels.sort(key=dev_self, reverse=True)
    cpu_ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"wall_ms_per_step": wall_ms, "kernel_ms_per_step": k_total, "kernels_per_step": k_count,
            "gpu_busy_fraction": (k_total / wall_ms) if wall_ms > 0 else None,
            "top_kernels": [{"name": e.key[:120], "calls_per_step": e.count / steps,
                             "ms_per_step": dev_self(e) / 1e3 / steps,
                             "share": dev_self(e) / 1e3 / steps / k_total if k_total else None}
                            for e in kernels[:top]],
            "top_cpu_ops": [{"name": e.key[:80], "calls_per_step": e.count / steps,
                             "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in cpu_ops[:top]]}


class _CpuKernel:
    def __init__(self, name, duration):
        self.name, self.duration = name, duration


def kernel_makers(prof, steps: int, patterns: list[str], top: int = 12) -> list[dict]:
    """Which code launched the kernels whose names contain one of ``patterns`` (a captured step's trace names kernels
    only): each kernel is charged to the CPU op that launched it (torch's correlation of a kernel with its op), and
    grouped by that op's name, its input shapes, the names of its four nearest enclosing ops (an autograd node's
    ``evaluate_function``, a ``record_function`` range) and the innermost frame of lyco's code on its Python stack (the
    profile must record shapes and stacks; without a device, the CPU ops themselves stand for kernels). Per pattern
    the ``top`` groups by device time, per step. On the GPU machine (torch 2.11, session 35) no Python frames came
    back, so the frame stays empty there; the op, its shapes and the enclosing autograd node named every maker looked
    for."""
    out = []
    groups: dict = {}
    cpu_only = not any(getattr(e, "kernels", None) for e in prof.events())
    for e in prof.events():
        kernels = getattr(e, "kernels", None) or []
        if cpu_only and str(e.device_type).endswith("CPU"):
            kernels = [_CpuKernel(e.name, e.self_cpu_time_total)] if e.name.startswith("aten::") else []
        for k in kernels:
            pat = next((p for p in patterns if p in k.name), None)
            if pat is None:
                continue
            # with stacks recorded, torch (2.x) makes each Python frame an enclosing event named "file.py(line): fn"
            # (some torch versions give the op its stack as a list of frames instead)
            chain, par = [], e.cpu_parent
            frame = next((f for f in (getattr(e, "stack", None) or ()) if "lyco/" in f and "benchmarks/" not in f), "")
            frame = frame.split("lyco/")[-1]
            while par is not None and (len(chain) < 4 or not frame):
                py = ".py(" in par.name or par.name.startswith("<built-in")
                if not py and len(chain) < 4:  # a module's instance number dropped: one group per kind
                    chain.append(re.sub(r"^(nn\.Module: \w+?)_\d+$", r"\1", par.name)[:60])
                if py and not frame and "lyco/" in par.name and "benchmarks/" not in par.name:
                    frame = par.name.split("lyco/")[-1]
                par = par.cpu_parent
            key = (pat, e.name, str(e.input_shapes)[:160], " < ".join(chain), frame[:90])
            g = groups.setdefault(key, [0, 0.0, k.name[:80]])
            g[0] += 1
            g[1] += k.duration
    for pat in patterns:
        rows = sorted(((v[1], v[0], key, v[2]) for key, v in groups.items() if key[0] == pat), reverse=True)[:top]
        for us, n, key, kname in rows:
            out.append({"pattern": pat, "op": key[1], "shapes": key[2], "parents": key[3], "lyco_frame": key[4],
                        "kernel": kname, "calls_per_step": n / steps, "ms_per_step": us / 1e3 / steps})
    return out


def format_maker(k: dict) -> str:
    """One :func:`kernel_makers` row as a line: pattern, time and calls per step, op, shapes, parents, lyco's frame."""
    return (f"{k['pattern']:<22} {k['ms_per_step']:7.3f} ms {k['calls_per_step']:4.0f}×  {k['op']} {k['shapes']} < "
            f"{k['parents']} @ {k['lyco_frame'] or '-'}")


def format_profile(name: str, pr: dict) -> str:
    """:func:`summarize_profile`'s record as text."""
    busy = pr.get("gpu_busy_fraction")
    lines = [f"== {name}: wall {pr['wall_ms_per_step']:.1f} ms/step (profiled), kernels {pr['kernels_per_step']:.0f}/step "
             f"summing to {pr['kernel_ms_per_step']:.1f} ms (GPU busy {busy * 100 if busy else float('nan'):.0f} %)"]
    for k in pr["top_kernels"]:
        share = k["share"] * 100 if k["share"] is not None else float("nan")
        lines.append(f"  {k['ms_per_step']:8.2f} ms {share:5.1f} % {k['calls_per_step']:7.0f}×  {k['name']}")
    lines += [f"  {format_maker(k)}" for k in pr.get("makers", ())]
    lines.append("  CPU self time, top ops:")
    for k in pr["top_cpu_ops"]:
        lines.append(f"  {k['self_cpu_ms_per_step']:8.2f} ms        {k['calls_per_step']:7.0f}×  {k['name']}")
    return "\n".join(lines)


class StepProfiler:
    """A :class:`lyco.train.loop.Trainer` callback: torch.profiler over the optimizer steps ``start+1 … start+n``
    (everything the trainer does between two ``step`` events: data, the forward/backward or its graph replay,
    clipping, the optimizer, logging), summarised by :func:`summarize_profile` into :attr:`result`."""

    def __init__(self, start: int, n: int, top: int = 25):
        self.start, self.n, self.top = start, n, top
        self.result: dict | None = None
        self._prof = None
        self._t0 = 0.0

    def __call__(self, trainer, event: str, step: int = 0, **_):
        if event != "step" or self.result is not None:
            return
        import time
        torch = _torch()
        cuda = torch.cuda.is_available()
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile
            if cuda:
                torch.cuda.synchronize()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self._prof = profile(activities=acts)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        elif self._prof is not None and step == self.start + self.n:
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - self._t0) * 1e3 / self.n
            self._prof.__exit__(None, None, None)
            self.result = summarize_profile(self._prof, self.n, wall, cuda, self.top)
            self._prof = None


def lin_layer_shapes(model: str, batch: int, dev, smoke: bool) -> list[tuple]:
    """``[(rows, in, out, weight shape, count)]`` of ``benchmarks/train_step.py``'s ``lin`` set for ``model`` at
    ``batch``, from one no-grad forward of the bf16 U-Net on ``dev`` (shape hooks; ``smoke``: the tiny U-Net) — the
    per-layer kernel benchmarks' layer list."""
    import collections

    import train_step as ts
    torch = _torch()
    dt = torch.bfloat16
    unet = ts.build_unet(model, smoke, dev, dt)
    names = ts.layer_sets(unet)["lin"]
    mods = dict(unet.named_modules())
    latent = ts.SMOKE_LATENT if smoke else ts.MODELS[model]["latent"]
    shapes = ts.layer_input_shapes(unet, names, batch, latent, dev, dt)
    c = collections.Counter()
    for n in names:
        s, w = shapes[n], mods[n].weight
        rows = s[0] * s[2] * s[3] if w.dim() == 4 else s[:-1].numel()
        c[(rows, w.shape[1], w.shape[0], tuple(w.shape))] += 1
    del unet
    if not smoke:
        torch.cuda.empty_cache()
    return [(r, i, o, ws, k) for (r, i, o, ws), k in sorted(c.items())]
