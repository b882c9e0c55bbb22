"""A captured CUDA graph's memset nodes replaced by kernel nodes doing the same (issue 7, session 41).

The libraries a training step calls issue memsets inside the capture — going by the kernel after each in run 292's
trace: cuDNN's attention before each of its forward and backward kernels, cuDNN's convolutions, cuBLAS — and each
becomes a *memset node* of the graph.
In a replay the kernel after a memset node starts late: run 292 (H200, SD1.5 b1) measured 5.3 µs on average from
each of the floor's 94 memset nodes to the kernel after it, 9.3 µs in LoKr's step (95 nodes; a graph with the
adapters' side streams), where a kernel follows the one before it on its stream 0.42 µs after it ends (the
median of both traces' other such pairs). The same
steps with every memset node made a kernel node after capture (run 296, ``benchmarks/run_memset41.sh``, off / on /
off): the floor 19.86 / 19.68 / 19.87 ms, LoKr 25.86 / 25.47 / 25.87, LoRA 22.07 / 21.65 / 22.08. (A chain of
small kernels with and without memsets — ``benchmarks/experiments/memset_node_bench.py``, runs 294–295 — showed
nothing like it: the wait is not the node type alone; what makes it long in the step is not known.)

:func:`replace_memsets` walks the graph's nodes through the CUDA driver (``libcuda``, by ``ctypes``: no new
dependency), and for each memset node adds a kernel node — :data:`_PTX`, a grid-stride store loop, loaded once per
context — with the memset's destination, pitch, value, element size, width and height, after the memset's
dependencies and before its dependents, then removes the memset node. Byte and half-word memsets whose rows allow it
are written as 16- or 4-byte words (:func:`plan`). A replacement that fails half-way is undone (the kernel node
removed, the memset kept) and no further node is touched: the graph is never left with a node that lacks an edge.

Used by :class:`lyco.train.graphs.GraphedStep` on every capture (and by ``benchmarks/train_step.py`` for every
variant's graph, the floor's included); **on by default** since run 298, ``LYCO_GRAPH_MEMSETS=0`` leaves graphs as
captured. Run 297 found the first form's self-test failing on the H200 ("listing graph nodes failed: invalid
argument": the driver refuses a node list asked for with a count of 0 — the self-test's first memset has no
dependency, its last no dependent, where the step's memsets have both, which is why run 296's probe did not meet it);
with :func:`_nodes` fixed, run 298 (H200, ``benchmarks/run_memset42.sh``, on / off / on): the self-test passed, the
trainer's graphs equal eager for lora, locon and lokr with 92–186 memset nodes replaced, and SD1.5 b1 the floor
19.81 / 19.98 / 19.81 ms, LoKr 25.64 / 26.08 / 25.64, LoRA 21.80 / 22.21 / 21.79, LoCon 23.40 / 23.80 / 23.38.
Where the driver calls are not available (no CUDA, another platform, a torch without ``CUDAGraph(keep_graph=True)``)
or the self-test fails — a graph with memsets of each element size, 2-D included, replayed with and without the
replacement, the bytes compared — the graph stays as captured, with one warning.
"""

from __future__ import annotations

import ctypes
import os
import warnings

import torch

#: what the kernel node's launch covers: threads per block, blocks per multiprocessor at most
_THREADS = 256
_BLOCKS_PER_SM = 4

#: ``lyco_memset(dst, pitch, value, esize, width, height)``: element e of ``width × height`` (row e / width, column
#: e mod width) at ``dst + row·pitch + column·esize`` gets ``value`` — its low byte (esize 1), half-word (2), the
#: word (4) or the word four times (16, one vector store). ``height == 1`` skips the division.
_PTX = r""".version 7.0
.target sm_70
.address_size 64

.visible .entry lyco_memset(.param .u64 p_dst, .param .u64 p_pitch, .param .u32 p_val, .param .u32 p_es,
                            .param .u64 p_w, .param .u64 p_h)
{
    .reg .pred %p<6>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<16>;
    ld.param.u64 %rd1, [p_dst];
    ld.param.u64 %rd2, [p_pitch];
    ld.param.u32 %r1, [p_val];
    ld.param.u32 %r2, [p_es];
    ld.param.u64 %rd3, [p_w];
    ld.param.u64 %rd4, [p_h];
    mul.lo.u64 %rd5, %rd3, %rd4;
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mov.u32 %r6, %nctaid.x;
    mul.wide.u32 %rd6, %r3, %r4;
    cvt.u64.u32 %rd7, %r5;
    add.u64 %rd6, %rd6, %rd7;
    mul.wide.u32 %rd8, %r6, %r4;
    cvt.u64.u32 %rd15, %r2;
    setp.eq.u64 %p4, %rd4, 1;
LOOP:
    setp.ge.u64 %p1, %rd6, %rd5;
    @%p1 bra DONE;
    mov.u64 %rd9, 0;
    mov.u64 %rd10, %rd6;
    @%p4 bra ADDR;
    div.u64 %rd9, %rd6, %rd3;
    mul.lo.u64 %rd10, %rd9, %rd3;
    sub.u64 %rd10, %rd6, %rd10;
ADDR:
    mul.lo.u64 %rd11, %rd9, %rd2;
    mul.lo.u64 %rd12, %rd10, %rd15;
    add.u64 %rd13, %rd1, %rd11;
    add.u64 %rd13, %rd13, %rd12;
    setp.eq.u32 %p5, %r2, 16;
    @%p5 st.global.v4.u32 [%rd13], {%r1, %r1, %r1, %r1};
    setp.eq.u32 %p2, %r2, 4;
    @%p2 st.global.u32 [%rd13], %r1;
    setp.eq.u32 %p3, %r2, 2;
    @%p3 st.global.u16 [%rd13], %r1;
    setp.eq.u32 %p3, %r2, 1;
    @%p3 st.global.u8 [%rd13], %r1;
    add.u64 %rd6, %rd6, %rd8;
    bra LOOP;
DONE:
    ret;
}
"""

_MEMSET_NODE = 2  # CU_GRAPH_NODE_TYPE_MEMSET


#: ``LYCO_GRAPH_MEMSETS`` when unset: on since run 298 verified the self-test, the graphs and the gain (module doc)
DEFAULT = "1"


def wanted() -> bool:
    """``LYCO_GRAPH_MEMSETS`` (:data:`DEFAULT` when unset; ``1`` replaces, ``0`` leaves graphs as captured)."""
    v = os.environ.get("LYCO_GRAPH_MEMSETS", DEFAULT)
    if v not in ("0", "1"):
        raise ValueError(f"LYCO_GRAPH_MEMSETS={v!r}: expected 0 or 1 (a captured graph's memset nodes as kernel nodes)")
    return v == "1"


def new_graph() -> "torch.cuda.CUDAGraph":
    """A ``CUDAGraph`` that keeps its captured graph for :func:`replace_memsets` where that is wanted and torch can
    (``keep_graph=True``; the caller then instantiates it), else a plain one."""
    if wanted() and _available():
        try:
            return torch.cuda.CUDAGraph(keep_graph=True)
        except TypeError:  # a torch before keep_graph
            pass
    return torch.cuda.CUDAGraph()


def finish(graph: "torch.cuda.CUDAGraph") -> int:
    """After the capture of a graph from :func:`new_graph`: its memset nodes replaced (where it kept its graph) and
    the graph instantiated. Returns the nodes replaced."""
    done = 0
    if _kept(graph):
        done = replace_memsets(graph)
        graph.instantiate()
    return done


def _kept(graph) -> bool:
    try:
        graph.raw_cuda_graph()
    except (RuntimeError, AttributeError):
        return False
    return True


def plan(dst: int, pitch: int, value: int, element_size: int, width: int, height: int,
         sms: int) -> tuple[tuple[int, int, int, int, int, int], int]:
    """The kernel's arguments ``(dst, pitch, value, esize, width, height)`` and its blocks for a memset node's
    parameters: elements widened to 16-byte (else 4-byte) words where the start, the pitch (several rows) and the
    row's bytes allow, the value repeated to fill the word."""
    if element_size not in (1, 2, 4):
        raise ValueError(f"a memset node's element size is 1, 2 or 4 bytes, not {element_size}")
    es, w = element_size, width
    val = value & ((1 << (8 * es)) - 1)
    row_bytes = w * es
    for wide in (16, 4):
        if wide > es and dst % wide == 0 and row_bytes % wide == 0 and (height == 1 or pitch % wide == 0):
            val = val * (0x01010101 if es == 1 else 0x00010001 if es == 2 else 1)
            es, w = wide, row_bytes // wide
            break
    total = w * height
    blocks = max(1, min(-(-total // _THREADS), _BLOCKS_PER_SM * max(1, sms)))
    return (dst, pitch, val & 0xFFFFFFFF, es, w, height), blocks


# -- the driver ---------------------------------------------------------------------------------------------------
class _MemsetParams(ctypes.Structure):  # CUDA_MEMSET_NODE_PARAMS
    _fields_ = [("dst", ctypes.c_uint64), ("pitch", ctypes.c_size_t), ("value", ctypes.c_uint),
                ("elementSize", ctypes.c_uint), ("width", ctypes.c_size_t), ("height", ctypes.c_size_t)]


class _KernelParams(ctypes.Structure):  # CUDA_KERNEL_NODE_PARAMS_v2
    _fields_ = [("func", ctypes.c_void_p), ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint),
                ("blockDimZ", ctypes.c_uint), ("sharedMemBytes", ctypes.c_uint),
                ("kernelParams", ctypes.POINTER(ctypes.c_void_p)), ("extra", ctypes.POINTER(ctypes.c_void_p)),
                ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


_DRIVER: list = []         # [libcuda] once loaded, [None] where it cannot be
_FUNCS: dict = {}          # device index → (module, function), the module kept loaded for the graphs' lifetime
_CHECKED: dict = {}        # device index → self-test passed
_WARNED: set = set()


def _driver():
    if not _DRIVER:
        try:
            cu = ctypes.CDLL("libcuda.so.1")
            cu.cuGraphAddKernelNode_v2  # noqa: B018 - a driver before CUDA 12 lacks it
            _DRIVER.append(cu)
        except (OSError, AttributeError):
            _DRIVER.append(None)
    return _DRIVER[0]


def _available() -> bool:
    return torch.cuda.is_available() and _driver() is not None and hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph")


def _warn(why: str) -> None:
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"lyco: a CUDA graph's memset nodes stay as captured ({why}; LYCO_GRAPH_MEMSETS=0 silences "
                      "this)", RuntimeWarning, stacklevel=3)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")


def _function(device: int):
    got = _FUNCS.get(device)
    if got is None:
        cu = _driver()
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(device):
            torch.cuda.init()
            _check(cu.cuModuleLoadData(ctypes.byref(mod), ctypes.create_string_buffer(_PTX.encode())),
                   "loading the memset kernel")
            _check(cu.cuModuleGetFunction(ctypes.byref(fn), mod, b"lyco_memset"), "finding the memset kernel")
        got = _FUNCS[device] = (mod, fn)
    return got[1]


def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _nodes(query, *args) -> list[int]:
    n = ctypes.c_size_t(0)
    _check(query(*args, None, ctypes.byref(n)), "listing graph nodes")
    # an array with a count of 0 is an invalid argument to the driver: run 297's self-test failure; run 298's
    # passed with this
    if n.value == 0:
        return []
    arr = (ctypes.c_void_p * max(1, n.value))()
    _check(query(*args, arr, ctypes.byref(n)), "listing graph nodes")
    return [arr[i] for i in range(n.value)]


def memset_nodes(graph) -> int:
    """How many memset nodes ``graph`` (kept: ``keep_graph=True``) has."""
    cu = _driver()
    count = 0
    for node in _nodes(cu.cuGraphGetNodes, ctypes.c_void_p(graph.raw_cuda_graph())):
        t = ctypes.c_int(0)
        _check(cu.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t)), "reading a node's type")
        count += t.value == _MEMSET_NODE
    return count


def _replace_all(graph, device: int) -> int:
    """Every memset node of ``graph`` as a kernel node (module doc); raises on the first failure, after undoing
    that node's half-made replacement."""
    cu = _driver()
    g = ctypes.c_void_p(graph.raw_cuda_graph())
    fn = _function(device)
    sms = _sm_count(device)
    done = 0
    for node in _nodes(cu.cuGraphGetNodes, g):
        node = ctypes.c_void_p(node)
        t = ctypes.c_int(0)
        _check(cu.cuGraphNodeGetType(node, ctypes.byref(t)), "reading a node's type")
        if t.value != _MEMSET_NODE:
            continue
        mp = _MemsetParams()
        _check(cu.cuGraphMemsetNodeGetParams(node, ctypes.byref(mp)), "reading a memset node")
        deps = _nodes(cu.cuGraphNodeGetDependencies, node)
        after = _nodes(cu.cuGraphNodeGetDependentNodes, node)
        args, blocks = plan(mp.dst, mp.pitch, mp.value, mp.elementSize, mp.width, mp.height, sms)
        vals = [ctypes.c_uint64(args[0]), ctypes.c_uint64(args[1]), ctypes.c_uint32(args[2]),
                ctypes.c_uint32(args[3]), ctypes.c_uint64(args[4]), ctypes.c_uint64(args[5])]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in vals])
        kp = _KernelParams(func=fn, gridDimX=blocks, gridDimY=1, gridDimZ=1, blockDimX=_THREADS, blockDimY=1,
                           blockDimZ=1, sharedMemBytes=0, extra=None, kern=None, ctx=None,
                           kernelParams=ctypes.cast(ptrs, ctypes.POINTER(ctypes.c_void_p)))
        k = ctypes.c_void_p()
        dep_arr = (ctypes.c_void_p * max(1, len(deps)))(*deps)
        _check(cu.cuGraphAddKernelNode_v2(ctypes.byref(k), g, dep_arr, ctypes.c_size_t(len(deps)), ctypes.byref(kp)),
               "adding a kernel node")
        try:
            for succ in after:
                _check(cu.cuGraphAddDependencies(g, ctypes.byref(k), ctypes.byref(ctypes.c_void_p(succ)),
                                                 ctypes.c_size_t(1)), "adding an edge")
            _check(cu.cuGraphDestroyNode(node), "removing a memset node")
        except Exception:
            cu.cuGraphDestroyNode(k)  # its edges go with it: the memset node stands as captured
            raise
        done += 1
    return done


def replace_memsets(graph) -> int:
    """Every memset node of ``graph`` — a ``CUDAGraph(keep_graph=True)`` after its capture, before it is
    instantiated — replaced by a kernel node (module doc). Returns how many; 0, the graph as captured and one
    warning where the driver or the device's self-test says no."""
    if not wanted():
        return 0
    if not _available():
        _warn("the CUDA driver's graph calls are not available")
        return 0
    device = torch.cuda.current_device()  # the capture's: a graph is captured on the current device
    if device not in _CHECKED:
        if torch.cuda.is_current_stream_capturing():
            return 0
        sync_mode = torch.cuda.get_sync_debug_mode()  # the test reads its bytes back (allowed here: no capture)
        try:
            torch.cuda.set_sync_debug_mode(0)
            why = _self_test(device)
        except Exception as exc:  # noqa: BLE001 - a driver or capture failure: graphs as captured
            why = f"{type(exc).__name__}: {exc}"
        finally:
            torch.cuda.set_sync_debug_mode(sync_mode)
        _CHECKED[device] = why is None
        if why is not None:
            _warn(f"the self-test failed on cuda:{device}: {why}")
    if not _CHECKED[device]:
        return 0
    try:
        return _replace_all(graph, device)
    except Exception as exc:  # noqa: BLE001 - the graph stays valid (module doc): train on
        _warn(f"{type(exc).__name__}: {exc}")
        return 0


def _self_test(device: int) -> str | None:
    """A graph of driver memsets — bytes at an odd offset, half-words, words, a 2-D byte memset with a pitch, one
    word-aligned byte run — over random bytes, replayed as captured and with its memsets replaced: None where the
    bytes agree with each other and with torch's indexing of the expected result, else what differs."""
    cu = _driver()
    with torch.cuda.device(device):
        gen = torch.Generator(device="cpu").manual_seed(0)
        init = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=gen).cuda()
        buf = init.clone()
        base = buf.data_ptr()
        ops = [(1, base + 3, 0x5A, 1001),            # bytes, odd start
               (2, base + 4098, 0xBEEF, 777),        # half-words
               (4, base + 8192, 0x01234567, 2050),   # words
               (1, base + 20480, 0, 4096)]           # a 16-byte aligned byte run
        calls = {1: (cu.cuMemsetD8Async, ctypes.c_ubyte), 2: (cu.cuMemsetD16Async, ctypes.c_ushort),
                 4: (cu.cuMemsetD32Async, ctypes.c_uint)}
        want = init.clone()
        for es, ptr, val, n in ops:
            pattern = torch.tensor(list(val.to_bytes(es, "little")), dtype=torch.uint8).repeat(n)
            want[ptr - base: ptr - base + es * n] = pattern.cuda()
        pitch, rows, cols = 320, 5, 100  # 2-D: rows of `cols` bytes every `pitch` bytes
        p2 = base + 32768 + 1
        for r in range(rows):
            want[p2 - base + r * pitch: p2 - base + r * pitch + cols] = 0x3C
        results = []
        for replace in (False, True):
            buf.copy_(init)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph(keep_graph=True)
            s = torch.cuda.Stream()
            with torch.cuda.graph(graph, stream=s, capture_error_mode="thread_local"):
                h = ctypes.c_void_p(s.cuda_stream)
                for es, ptr, val, n in ops:
                    fn, ctype = calls[es]
                    _check(fn(ctypes.c_uint64(ptr), ctype(val), ctypes.c_size_t(n), h), f"a {es}-byte memset")
                _check(cu.cuMemsetD2D8Async(ctypes.c_uint64(p2), ctypes.c_size_t(pitch), ctypes.c_ubyte(0x3C),
                                            ctypes.c_size_t(cols), ctypes.c_size_t(rows), h), "cuMemsetD2D8Async")
            if replace:
                done = _replace_all(graph, device)
                if done != len(ops) + 1 or memset_nodes(graph) != 0:
                    return f"{done} of {len(ops) + 1} memset nodes replaced"
            graph.instantiate()
            graph.replay()
            torch.cuda.synchronize()
            results.append(buf.clone())
        if not torch.equal(results[0], want):
            return "the captured memsets' bytes differ from the expected ones"
        if not torch.equal(results[1], want):
            bad = int((results[1] != want).sum())
            return f"{bad} bytes differ from the captured memsets'"
    return None
