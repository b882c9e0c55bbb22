"""A captured graph's memset nodes as kernel nodes (``lyco.train.graph_memsets``): on the CPU, what the host decides —
the kernel's arguments for a memset node's parameters (:func:`plan`) — against the memset's own semantics, byte for
byte, by emulating both; the kernel's PTX assembled by Triton's ``ptxas``; the switch; and the contract where the
driver is absent (the graph untouched, one warning). On the GPU the module's self-test and
``benchmarks/check_cuda_graph.py`` (trainer graphs = eager) cover the driver calls and the kernel itself."""

from __future__ import annotations

import ctypes
import random
import subprocess
import warnings
from pathlib import Path

import pytest

from lyco.train import graph_memsets as M

BASE = 1 << 20  # the emulated buffer's device address


def _memset(buf: bytearray, dst, pitch, value, es, width, height):
    """cuMemsetD2D{8,16,32}: ``height`` rows of ``width`` elements of ``es`` bytes, every ``pitch`` bytes."""
    word = (value & ((1 << (8 * es)) - 1)).to_bytes(es, "little")
    for r in range(height):
        start = dst - BASE + r * pitch
        buf[start:start + es * width] = word * width


def _kernel(buf: bytearray, args, blocks):
    """The PTX kernel's stores (its doc): element e at dst + (e // w)·pitch + (e % w)·esize gets the value's low
    byte, half-word, word, or the word four times — each of the grid's threads from its index in steps of the grid;
    every store naturally aligned, as the GPU requires."""
    dst, pitch, val, es, w, h = args
    threads = blocks * M._THREADS
    data = {1: val.to_bytes(4, "little")[:1], 2: val.to_bytes(4, "little")[:2], 4: val.to_bytes(4, "little"),
            16: val.to_bytes(4, "little") * 4}[es]
    for t in range(threads):
        for e in range(t, w * h, threads):
            row, col = (0, e) if h == 1 else divmod(e, w)
            a = dst - BASE + row * pitch + col * es
            assert (BASE + a) % len(data) == 0, "a misaligned store (the GPU faults on it)"
            buf[a:a + len(data)] = data


CASES = [  # (offset, pitch, value, element size, width, height)
    (0, 0, 0, 1, 4096, 1),          # a zeroed 16-byte aligned run: 16-byte words
    (3, 0, 0x5A, 1, 1001, 1),       # an odd start: bytes
    (4, 0, 0x7F, 1, 1000, 1),       # word aligned, not 16: 4-byte words
    (2, 0, 0xBEEF, 2, 777, 1),      # half-words
    (8, 0, 0x1234, 2, 6, 1),        # half-words as three words
    (16, 0, 0x01234567, 4, 2050, 1),
    (32, 0, 0xDEADBEEF, 4, 8, 1),   # two 16-byte words
    (1, 320, 0x3C, 1, 100, 5),      # 2-D bytes, odd start
    (0, 64, 0xAB, 1, 48, 7),        # 2-D, rows of three 16-byte words
    (0, 36, 0xCD, 1, 36, 3),        # 2-D, pitch a multiple of 4, not 16
    (0, 20, 0x11, 1, 16, 3),        # 2-D, 16-byte rows every 20 bytes: words, not 16-byte stores
    (6, 40, 0x55AA, 2, 5, 4),       # 2-D half-words
    (12, 48, 0x89ABCDEF, 4, 3, 2),  # 2-D words
    (0, 0, 0x1FF, 1, 5, 1),         # a value wider than its element: the low byte
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("sms", [1, 132])
def test_plan_writes_the_memsets_bytes(case, sms):
    """The kernel's stores with :func:`plan`'s arguments and blocks leave the same bytes as the memset node — the
    rest of the buffer untouched — on a buffer of random bytes."""
    off, pitch, value, es, width, height = case
    rng = random.Random(off * 7 + width)
    init = bytearray(rng.getrandbits(8) for _ in range(16384))
    want, got = bytearray(init), bytearray(init)
    _memset(want, BASE + off, pitch, value, es, width, height)
    args, blocks = M.plan(BASE + off, pitch, value, es, width, height, sms)
    _kernel(got, args, blocks)
    assert got == want
    assert 1 <= blocks <= M._BLOCKS_PER_SM * sms


def test_plan_widens_to_the_largest_word_the_alignment_allows():
    """16-byte stores where start, pitch and row bytes are multiples of 16; words where of 4; else as given."""
    assert M.plan(BASE, 0, 0, 1, 4096, 1, 132)[0][3:5] == (16, 256)
    assert M.plan(BASE + 4, 0, 0, 1, 4096, 1, 132)[0][3:5] == (4, 1024)
    assert M.plan(BASE + 3, 0, 0, 1, 4096, 1, 132)[0][3:5] == (1, 4096)
    assert M.plan(BASE, 36, 0, 1, 32, 2, 132)[0][3:5] == (4, 8)  # rows of 32 bytes, pitch 36: words
    with pytest.raises(ValueError, match="element size"):
        M.plan(BASE, 0, 0, 8, 4, 1, 132)


def _ptxas() -> Path:
    triton = pytest.importorskip("triton")
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.parametrize("arch", ["sm_70", "sm_80", "sm_90"])
def test_the_kernel_assembles(tmp_path, arch):
    """The PTX the driver loads at run time assembles for the GPUs the trainer's graphs run on."""
    src = tmp_path / "memset.ptx"
    src.write_text(M._PTX)
    r = subprocess.run([str(_ptxas()), f"-arch={arch}", str(src), "-o", str(tmp_path / "memset.cubin")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "memset.cubin").stat().st_size > 0


def test_the_switch(monkeypatch):
    monkeypatch.delenv("LYCO_GRAPH_MEMSETS", raising=False)
    assert M.wanted() == (M.DEFAULT == "1")
    monkeypatch.setenv("LYCO_GRAPH_MEMSETS", "1")
    assert M.wanted()
    monkeypatch.setenv("LYCO_GRAPH_MEMSETS", "0")
    assert not M.wanted()
    assert M.replace_memsets(object()) == 0  # off: nothing asked of the graph
    monkeypatch.setenv("LYCO_GRAPH_MEMSETS", "yes")
    with pytest.raises(ValueError, match="LYCO_GRAPH_MEMSETS='yes'"):
        M.wanted()


def test_without_the_driver_the_graph_stays_as_captured(monkeypatch):
    """No CUDA driver: nothing is asked of the graph, 0 replaced, one warning saying why (once)."""
    monkeypatch.setenv("LYCO_GRAPH_MEMSETS", "1")
    monkeypatch.setattr(M, "_DRIVER", [None])
    monkeypatch.setattr(M, "_WARNED", set())

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the graph was asked for {name}")

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert M.replace_memsets(Untouchable()) == 0
        assert M.replace_memsets(Untouchable()) == 0
    msgs = [str(x.message) for x in w if "memset nodes" in str(x.message)]
    assert len(msgs) == 1 and "not available" in msgs[0]


# -- the graph's rewiring, against a stand-in for the driver -------------------------------------------------------
KERNEL, MEMSET = 0, 2


class FakeDriver:
    """The driver calls :func:`graph_memsets._replace_all` makes, over a graph kept as Python sets: node types,
    memset parameters, edges, and what each added kernel node was given (its arguments read through the pointers it
    was handed). Like the real driver (run 297), a node list asked for with a count of 0 is an invalid argument;
    ``fail_edge`` makes the n-th ``cuGraphAddDependencies`` fail."""

    def __init__(self, types, edges, memsets, fail_edge=None):
        self.types, self.edges, self.memsets = dict(types), set(edges), dict(memsets)
        self.kernels, self.next_id, self.edge_calls, self.fail_edge = {}, 1000, 0, fail_edge

    @staticmethod
    def _fill(arr, pn, items):
        if arr is None:
            pn._obj.value = len(items)
            return 0
        if pn._obj.value == 0:
            return 1
        for i, v in enumerate(sorted(items)):
            arr[i] = v
        return 0

    def cuGraphGetNodes(self, g, arr, pn):
        return self._fill(arr, pn, list(self.types))

    def cuGraphNodeGetType(self, node, pt):
        pt._obj.value = self.types[node.value]
        return 0

    def cuGraphMemsetNodeGetParams(self, node, pp):
        for k, v in self.memsets[node.value].items():
            setattr(pp._obj, k, v)
        return 0

    def cuGraphNodeGetDependencies(self, node, arr, pn):
        return self._fill(arr, pn, [a for a, b in self.edges if b == node.value])

    def cuGraphNodeGetDependentNodes(self, node, arr, pn):
        return self._fill(arr, pn, [b for a, b in self.edges if a == node.value])

    def cuGraphAddKernelNode_v2(self, pk, g, deps, n, pkp):
        kp = pkp._obj
        kid, self.next_id = self.next_id, self.next_id + 1
        self.types[kid] = KERNEL
        kinds = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint64]
        args = tuple(ctypes.cast(kp.kernelParams[i], ctypes.POINTER(t)).contents.value for i, t in enumerate(kinds))
        self.kernels[kid] = (kp.func, args, kp.gridDimX, kp.blockDimX)
        for i in range(n.value):
            self.edges.add((deps[i], kid))
        pk._obj.value = kid
        return 0

    def cuGraphAddDependencies(self, g, pfrom, pto, n):
        self.edge_calls += 1
        if self.edge_calls == self.fail_edge:
            return 999
        self.edges.add((pfrom._obj.value, pto._obj.value))
        return 0

    def cuGraphDestroyNode(self, node):
        nid = node.value
        del self.types[nid]
        self.memsets.pop(nid, None)
        self.kernels.pop(nid, None)
        self.edges = {(a, b) for a, b in self.edges if nid not in (a, b)}
        return 0

    def cuGetErrorString(self, rc, pmsg):
        pmsg._obj.value = b"stand-in error"
        return 0


class FakeGraph:
    def raw_cuda_graph(self):
        return 7


MS1 = dict(dst=BASE + 16, pitch=0, value=0, elementSize=1, width=4096, height=1)
MS4 = dict(dst=BASE + 2, pitch=40, value=0xBEEF, elementSize=2, width=5, height=3)
# k0 → m1 → k2, m1 → k3, k0 → k3, m4 (no dependency) → k2, k2 → m5 (no dependent)
MS5 = dict(dst=BASE + 8, pitch=0, value=7, elementSize=4, width=3, height=1)
TYPES = {1: KERNEL, 2: MEMSET, 3: KERNEL, 4: KERNEL, 5: MEMSET, 6: MEMSET}
EDGES = {(1, 2), (2, 3), (2, 4), (1, 4), (5, 3), (3, 6)}


@pytest.fixture
def fake(monkeypatch):
    def make(**kw):
        drv = FakeDriver(TYPES, EDGES, {2: MS1, 5: MS4, 6: MS5}, **kw)
        monkeypatch.setattr(M, "_DRIVER", [drv])
        monkeypatch.setattr(M, "_function", lambda device: ctypes.c_void_p(4242))
        monkeypatch.setattr(M, "_sm_count", lambda device: 132)
        return drv
    return make


def test_memset_nodes_become_kernel_nodes_with_their_edges(fake):
    """Each memset node is gone; in its place a kernel node of the memset kernel with :func:`plan`'s arguments and
    grid, after the memset's dependencies and before its dependents — memsets without either included — and every
    other edge as it was."""
    drv = fake()
    assert M._replace_all(FakeGraph(), 0) == 3
    assert MEMSET not in drv.types.values()
    by_dst = {args[0]: kid for kid, (_, args, _, _) in drv.kernels.items()}
    k1, k4, k5 = by_dst[MS1["dst"]], by_dst[MS4["dst"]], by_dst[MS5["dst"]]
    assert drv.edges == {(1, k1), (k1, 3), (k1, 4), (1, 4), (k4, 3), (3, k5)}
    for kid, ms in ((k1, MS1), (k4, MS4), (k5, MS5)):
        func, args, grid, block = drv.kernels[kid]
        want_args, want_blocks = M.plan(ms["dst"], ms["pitch"], ms["value"], ms["elementSize"], ms["width"],
                                        ms["height"], 132)
        assert (func, args, grid, block) == (4242, want_args, want_blocks, M._THREADS)


def test_a_replacement_failing_half_way_is_undone(fake, monkeypatch):
    """An edge the driver refuses: the new kernel node is removed with its edges, the memset node stands as
    captured, nothing after it is touched — and the public call warns and reports 0."""
    drv = fake(fail_edge=2)  # the first memset (node 2) has two dependents: its second edge fails
    with pytest.raises(RuntimeError, match="adding an edge"):
        M._replace_all(FakeGraph(), 0)
    assert drv.types == TYPES and drv.edges == EDGES and not drv.kernels

    drv = fake(fail_edge=2)
    monkeypatch.setenv("LYCO_GRAPH_MEMSETS", "1")
    monkeypatch.setattr(M, "_available", lambda: True)
    monkeypatch.setattr(M, "_CHECKED", {0: True})
    monkeypatch.setattr(M, "_WARNED", set())
    monkeypatch.setattr(M.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(M.torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.warns(RuntimeWarning, match="stay as captured.*adding an edge"):
        assert M.replace_memsets(FakeGraph()) == 0
    assert drv.types == TYPES and drv.edges == EDGES
