"""benchmarks/memory_peak.py: the allocated total's peak over an allocator trace and the blocks live then by site,
checked against a brute-force count over every prefix of random traces."""

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import memory_peak  # noqa: E402

MIB = 2**20
_FRAMES = {
    "op": [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
           {"filename": "/w/src/lyco/algorithms/lowrank.py", "line": 990, "name": "forward"}],
    "peft": [{"filename": "/x/site-packages/peft/tuners/lora/layer.py", "line": 7, "name": "forward"}],
    "bare": [],
}


def _trace(seed, n=300):
    rnd = random.Random(seed)
    live, ev, addr = [], [], 0
    for _ in range(n):
        if live and rnd.random() < 0.45:
            a = live.pop(rnd.randrange(len(live)))
            ev.append({"action": "free_requested", "addr": a})
            ev.append({"action": "free_completed", "addr": a})
        else:
            addr += 1
            site = rnd.choice(list(_FRAMES))
            size = rnd.choice([512, 4096, MIB, 32 * MIB])
            ev.append({"action": "alloc", "addr": addr, "size": size, "frames": _FRAMES[site], "_site": site})
            live.append(addr)
        if rnd.random() < 0.05:
            ev.append({"action": "segment_alloc", "addr": 10**9 + addr, "size": 2 * MIB})
    return ev


@pytest.mark.parametrize("seed", range(5))
def test_peak_and_its_live_blocks_match_a_brute_force_count(seed):
    ev = _trace(seed)
    best, best_live = -1, None
    for i in range(len(ev)):  # the live set after every prefix, from scratch
        live = {}
        for e in ev[:i + 1]:
            if e["action"] == "alloc":
                live[e["addr"]] = e
            elif e["action"] == "free_completed":
                live.pop(e["addr"])
        tot = sum(e["size"] for e in live.values())
        if tot > best:
            best, best_live = tot, live
    out = memory_peak.peak({"device_traces": [ev]}, top=10)
    assert out["peak_mib"] == pytest.approx(best / MIB)
    want = {}
    for e in best_live.values():
        w = want.setdefault(e["_site"], [0, 0])
        w[0] += e["size"]
        w[1] += 1
    names = {"op": "lyco/algorithms/lowrank.py:990 forward", "peft": "peft/tuners/lora/layer.py:7 forward",
             "bare": "(no Python frame)"}
    got = {s: (m, n) for s, m, n in out["sites"]}
    assert got == {names[k]: (round(v[0] / MIB, 2), v[1]) for k, v in want.items()}
    assert out["workspaces"][0] == sum(e["size"] == 32 * MIB for e in best_live.values())


def test_a_free_of_a_block_allocated_before_the_trace_is_ignored():
    ev = [{"action": "free_completed", "addr": 7},
          {"action": "alloc", "addr": 1, "size": 3 * MIB, "frames": []},
          {"action": "free_completed", "addr": 1},
          {"action": "alloc", "addr": 2, "size": 2 * MIB, "frames": []}]
    out = memory_peak.peak({"device_traces": [ev]})
    assert out["peak_mib"] == 3 and out["at_event"] == 1 and out["sites"] == [["(no Python frame)", 3.0, 1]]
