"""benchmarks/graph_trace.py: the split of a timeline's span into idle time and each kernel's exposed time, checked
against a brute-force computation over a fine time grid on random timelines."""

import gzip
import json
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import graph_trace  # noqa: E402


def _grid(ks, step=0.25):
    """Exposed time per kernel and idle time charged to the kernel ending each gap, by sampling the timeline at
    every ``step`` (the kernels' times are multiples of ``step``, so sampling midpoints is exact)."""
    t0 = min(k["t"] for k in ks)
    t1 = max(k["t"] + k["d"] for k in ks)
    exposed = [0.0] * len(ks)
    idle = 0.0
    n = round((t1 - t0) / step)
    for i in range(n):
        mid = t0 + (i + 0.5) * step
        act = [j for j, k in enumerate(ks) if k["t"] < mid < k["t"] + k["d"]]
        if act:
            for j in act:
                exposed[j] += step / len(act)
        else:
            idle += step
    return exposed, idle, t1 - t0


@pytest.mark.parametrize("seed", range(6))
def test_summary_matches_a_sampled_timeline(seed):
    rng = random.Random(seed)
    ks = []
    for _ in range(30):
        t = rng.randrange(0, 400) * 0.25
        d = rng.randrange(1, 40) * 0.25
        ks.append({"n": rng.choice(["gemm_a", "triton_b", "elementwise_c", "xyz"]), "t": t, "d": d,
                   "s": rng.choice([7, 13])})
    ks.sort(key=lambda k: k["t"])
    s = graph_trace.summary(ks)
    exposed, idle, span = _grid(ks)
    assert s["span"] == pytest.approx(span)
    assert s["idle"] == pytest.approx(idle)
    assert s["busy"] == pytest.approx(span - idle)
    assert s["sum"] == pytest.approx(sum(k["d"] for k in ks))
    by_name = {}
    for k, e in zip(ks, exposed):
        by_name[k["n"]] = by_name.get(k["n"], 0.0) + e
    for n, e in by_name.items():
        assert s["names"][n]["exposed"] == pytest.approx(e)
    # every idle gap is charged to exactly one kernel (the one starting when it ends)
    assert sum(d["idle_before"] for d in s["names"].values()) == pytest.approx(idle)
    assert sum(d["exposed"] for d in s["kinds"].values()) == pytest.approx(span - idle)
    assert sum(v["count"] for v in s["streams"].values()) == len(ks)


def test_idle_is_charged_to_the_kernel_that_ends_the_gap():
    ks = [{"n": "gemm_a", "t": 0.0, "d": 2.0, "s": 7}, {"n": "triton_b", "t": 5.0, "d": 1.0, "s": 7},
          {"n": "gemm_a", "t": 5.5, "d": 1.0, "s": 9}]
    s = graph_trace.summary(ks)
    assert s["names"]["triton_b"]["idle_before"] == pytest.approx(3.0)
    assert s["names"]["gemm_a"]["idle_before"] == 0.0
    # 5.5–6.0 shared by two kernels, 6.0–6.5 gemm_a alone
    assert s["names"]["triton_b"]["exposed"] == pytest.approx(0.5 + 0.25)
    assert s["names"]["gemm_a"]["exposed"] == pytest.approx(2.0 + 0.25 + 0.5)


def test_chrome_trace_reading(tmp_path):
    ev = [{"ph": "X", "cat": "kernel", "name": "k2", "ts": 110.5, "dur": 3.0, "args": {"stream": 7}},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 90.0, "dur": 30.0},
          {"ph": "X", "cat": "kernel", "name": "k1", "ts": 100.0, "dur": 4.0, "args": {"stream": 9}},
          {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 120.0, "dur": 1.0, "args": {"stream": 7}}]
    p = tmp_path / "t.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    ks = graph_trace.from_chrome(p)
    assert [(k["n"], k["t"], k["d"], k["s"]) for k in ks] == [("k1", 0.0, 4.0, 9), ("k2", 10.5, 3.0, 7),
                                                              ("Memset", 20.0, 1.0, 7)]


def test_diff_and_format_name_the_kinds():
    a = graph_trace.summary([{"n": "nvjet_gemm", "t": 0.0, "d": 4.0, "s": 1}, {"n": "splitKreduce", "t": 6, "d": 1, "s": 1}])
    b = graph_trace.summary([{"n": "nvjet_gemm", "t": 0.0, "d": 4.0, "s": 1}])
    assert a["idle"] == pytest.approx(2.0) and a["kinds"]["splitK-reduce"]["idle_before"] == pytest.approx(2.0)
    text = graph_trace.diff(a, b, "x")
    assert "kernels +1," in text.splitlines()[0]
    assert any(line.split()[:2] == ["splitK-reduce", "+1"] for line in text.splitlines())
    assert graph_trace.kind("nvjet_hsh_128x64_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert graph_trace.kind("void at::native::vectorized_elementwise_kernel<4, ...>") == "elementwise"
    # cuDNN attention's helper kernels are attention, not convolution (their names contain "conv")
    assert graph_trace.kind("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*)") == "attention"
    assert graph_trace.kind("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv"


def test_load_reads_plain_and_gzipped(tmp_path):
    ks = [{"n": "k", "t": 0.0, "d": 1.5, "s": 7}]
    (tmp_path / "graph_trace_a.json").write_text(json.dumps({"kernels": ks}))
    with gzip.open(tmp_path / "graph_trace_b.json.gz", "wt") as f:
        json.dump({"kernels": ks}, f)
    assert graph_trace.load(tmp_path / "graph_trace_a.json") == graph_trace.load(tmp_path / "graph_trace_b.json.gz") == ks


@pytest.mark.parametrize("seed", range(6))
def test_gaps_match_a_sampled_timeline(seed):
    """:func:`graph_trace.gaps`: every idle run of a random timeline (found on a fine grid) under the pair around it —
    the kernel that ended last before it (of several ending then, the last to start) and the first to start after
    it — with its length; the gaps add up to the summary's idle time."""
    rng = random.Random(100 + seed)
    ks = []
    for _ in range(25):
        ks.append({"n": rng.choice(["memset", "sdpa", "gemm", "build"]), "t": rng.randrange(0, 300) * 0.25,
                   "d": rng.randrange(1, 12) * 0.25, "s": rng.choice([1, 2])})
    ks.sort(key=lambda k: k["t"])
    step = 0.25
    t0, t1 = ks[0]["t"], max(k["t"] + k["d"] for k in ks)
    n = round((t1 - t0) / step)
    idle = [not any(k["t"] < t0 + (i + 0.5) * step < k["t"] + k["d"] for k in ks) for i in range(n)]
    want: dict = {}
    i = 0
    while i < n:
        if not idle[i]:
            i += 1
            continue
        j = i
        while j < n and idle[j]:
            j += 1
        a, b = t0 + i * step, t0 + j * step
        before = [k for k in ks if k["t"] + k["d"] <= a + 1e-9]
        last = max(k["t"] + k["d"] for k in before)
        prev = [k for k in before if abs(k["t"] + k["d"] - last) < 1e-9][-1]
        nxt = next(k for k in ks if abs(k["t"] - b) < 1e-9)
        want.setdefault((prev["n"], nxt["n"]), []).append(b - a)
        i = j
    got = graph_trace.gaps(ks)
    assert set(got) == set(want)
    for key, v in want.items():
        assert sorted(got[key]) == pytest.approx(sorted(v)), key
    assert sum(sum(v) for v in got.values()) == pytest.approx(graph_trace.summary(ks)["idle"])
    assert "→" in graph_trace.fmt_gaps(got, "t")


def test_double_difference_names_what_only_one_pair_adds(tmp_path, capsys, monkeypatch):
    # (A − B) − (C − D): an adapter's kernels over its floor on one layout against another. "k_both" is added by
    # both adapters (cancels), "k_only" by A alone, "floor_x" differs between the floors alone (cancels as well)
    def tr(names_durs):
        ks, t = [], 0.0
        for n, d in names_durs:
            ks.append({"n": n, "t": t, "d": d, "s": 7})
            t += d + 1.0
        return ks

    A = tr([("floor_x", 5.0), ("k_both", 3.0), ("k_only", 7.0)])
    B = tr([("floor_x", 5.0)])
    C = tr([("floor_x", 9.0), ("k_both", 3.0)])
    D = tr([("floor_x", 9.0)])
    s = {k: graph_trace.summary(v) for k, v in zip("ABCD", (A, B, C, D))}
    dd = graph_trace.sub(graph_trace.sub(s["A"], s["B"]), graph_trace.sub(s["C"], s["D"]))
    assert dd["names"]["k_only"]["count"] == 1 and dd["names"]["k_only"]["sum"] == pytest.approx(7.0)
    assert dd["names"]["k_both"]["count"] == 0 and dd["names"]["k_both"]["sum"] == pytest.approx(0.0)
    assert dd["names"]["floor_x"]["sum"] == pytest.approx(0.0)
    # span: A's 5+1+3+1+7 = 17 minus B's 5, against C's 9+1+3 = 13 minus D's 9: +8
    assert dd["span"] == pytest.approx((17.0 - 5.0) - (13.0 - 9.0))
    # the command line: the same through files, k_only first among the kernel names
    paths = []
    for k, v in zip("ABCD", (A, B, C, D)):
        d = tmp_path / k
        d.mkdir()
        p = d / "graph_trace_x.json.gz"
        with gzip.open(p, "wt") as f:
            json.dump({"kernels": v}, f)
        paths.append(str(p))
    monkeypatch.setattr(sys, "argv", ["graph_trace.py", paths[0], paths[1], "--minus", paths[2], paths[3]])
    graph_trace.main()
    out = capsys.readouterr().out
    tail = out[out.index("(A/graph_trace_x − B/graph_trace_x) − (C/graph_trace_x − D/graph_trace_x)"):]
    names = tail[tail.index("kernel names"):].splitlines()[1:]
    assert "k_only" in names[0] and "+1×" in names[0]
