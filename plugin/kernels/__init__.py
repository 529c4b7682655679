"""Fused CPU kernels: the sign codecs with their feedback update in the same pass, the fused
server phase, the magnitude profile's weights, top-k selection and decoding (``topk.py``) and
the optimizers' update rules (``update.py``).

The torch path of a Markov worker makes several passes over memory and allocates full-size
temporaries (y = x - h, a byte per sign before packing, the decoded C(y)); the kernel in
``sign.cpp`` reads x and h once per block, while the block is in cache, writes h and the same
payload bytes. The kernels are plain C++ with OpenMP (joining the OpenMP runtime torch already
loaded; ``common.h`` holds what the files share), compiled together with the system ``g++`` at
first use (a few seconds of CPU; a torch C++ extension spends about 30 s compiling torch's
headers, too long for the first step of a job with timeouts) into a cache folder
(``$TORCH_EXTENSIONS_DIR/taciturn`` or ``~/.cache/taciturn/kernels``) under a name hashing the
sources, the flags and the CPU, and loaded with ctypes.

Callers ask ``usable(*tensors)`` first: true for contiguous CPU tensors when the library is
built. If it cannot be built (no compiler, a read-only cache...), one warning says why and the
codecs keep their torch path. ``TACITURN_KERNELS=0`` switches the kernels off; so does
``set_enabled(False)`` (the benchmark compares both paths in one process).
``TACITURN_KERNELS_ARCH`` (default ``native``) is the ``-march`` the library is built for: a
cache shared by machines with different CPUs wants a common one, e.g. ``x86-64-v3`` (AVX2).

CUDA tensors go to the Triton kernels of ``triton_sign.py`` and ``triton_update.py`` instead
(the same contract; bf16 inputs too), when triton imports (``pip install taciturn[triton]``; it
is imported at the first CUDA tensor, and if it cannot be, one warning says so and the torch path
stays). ``TACITURN_KERNELS=0`` and ``set_enabled`` switch them off as well.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..segments import Segments
from ..wire import Pieces, packed_len

_SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))
_FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared")
_SCALES = {"none": 0, "l1": 1, "l2": 2}
_UPDATES = {"none": 0, "markov": 1, "ef": 2}
#: fewer elements per thread do not pay for a team of threads (a fork/join, and a stall of a
#: scheduler tick whenever another process holds one of the cores)
_MIN_PER_THREAD = 1 << 18
#: the longest piece ``sign_serve`` takes (kLocal in sign.cpp: a piece that one thread keeps in cache)
LOCAL_MAX = 1 << 16

#: device types whose tensors go to the Triton kernels (tests/gpu adds "cpu" to run them, CPU
#: tensors under TRITON_INTERPRET=1, through the codecs)
TRITON_DEVICES = {"cuda"}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failed: Optional[str] = None
_triton_failed: Optional[str] = None
_triton_loaded = False
_enabled = os.environ.get("TACITURN_KERNELS", "1") != "0"

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
#: argument types of every exported function (all return void); a module that adds a .cpp
#: file next to sign.cpp adds its functions here
SIGNATURES = {
    "tac_sign_scales": [_ptr, _ptr, _ptr, _i64, _ptr, _f32, _ptr, _i64, _i64, _int, _ptr, _int],
    "tac_sign_encode": [_ptr, _ptr, _ptr, _i64, _ptr, _f32, _int, _ptr, _i64, _i64, _int, _ptr, _ptr, _ptr, _ptr,
                        _int],
    "tac_sign_decode": [_ptr, _ptr, _ptr, _i64, _i64, _int, _ptr, _ptr, _int, _int],
    "tac_sign_serve": [_ptr, _ptr, _int, _ptr, _i64, _i64, _int, _ptr, _ptr, _f32, _int, _ptr, _ptr, _ptr, _int],
    "tac_profile_means": [_ptr, _ptr, _i64, _ptr, _int],
    "tac_profile_weights": [_ptr, _ptr, _i64, _i64, _ptr, _int, _ptr, _int],
    "tac_topk_encode": [_ptr, _ptr, _f32, _int, _ptr, _i64, _i64, _ptr, _ptr, _int, _int],
    "tac_topk_decode": [_ptr, _i64, _i64, _int, _ptr, _int, _int],
    "tac_amsgrad": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _f32, _f32, _f32, _f32, _f32, _f32, _int],
    "tac_adam": [_ptr, _ptr, _ptr, _ptr, _i64, _f32, _f32, _f32, _f32, _f32, _f32, _f32, _int],
    "tac_momentum": [_ptr, _ptr, _ptr, _i64, _f32, _int],
    "tac_square_ema": [_ptr, _ptr, _i64, _f32, _f32, _int],
}


def cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) / "taciturn" if root else Path.home() / ".cache" / "taciturn" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: a library built on another CPU may not run here."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler: install g++ (apt-get install g++) or set CXX")
    flags = [*_FLAGS, f"-march={os.environ.get('TACITURN_KERNELS_ARCH', 'native')}"]
    sources = [f.read_bytes() for f in (*_SOURCES, *_HEADERS)]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(flags).encode(), compiler.encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, *map(str, _SOURCES), "-o", tmp], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # atomic: concurrent first builds (several ranks) are safe
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, built on first call; None (after one warning) if they cannot be."""
    global _lib, _failed
    if _lib is None and _failed is None:
        with _lock:
            if _lib is None and _failed is None:
                try:
                    _lib = _build()
                except Exception as exc:  # any failure leaves the torch path working
                    _failed = f"{type(exc).__name__}: {exc}"
                    warnings.warn(f"taciturn: the fused CPU kernels are unavailable ({_failed}); the sign "
                                  "codecs use their slower torch path", RuntimeWarning, stacklevel=3)
    return _lib


def triton_ready() -> bool:
    """Whether the Triton kernels can run: triton imported on the first call (one warning if it cannot be)."""
    global _triton_failed, _triton_loaded
    if not _triton_loaded and _triton_failed is None:
        with _lock:
            if not _triton_loaded and _triton_failed is None:
                try:
                    import triton  # noqa: F401
                    _triton_loaded = True
                except Exception as exc:  # any failure leaves the torch path working
                    _triton_failed = f"{type(exc).__name__}: {exc}"
                    warnings.warn(f"taciturn: the Triton kernels are unavailable ({_triton_failed}); CUDA tensors "
                                  "take the torch path (pip install taciturn[triton])", RuntimeWarning, stacklevel=3)
    return _triton_loaded


def set_enabled(flag: bool) -> bool:
    """Switch the kernels on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def _parts(tensors) -> list:
    """The tensors, a ``Segments`` as its parts, None entries left out."""
    return [p for t in tensors for p in (t.parts if isinstance(t, Segments) else [t]) if p is not None]


def on_triton(*tensors) -> bool:
    """Whether these tensors (at least one) are all on a device of the Triton kernels."""
    parts = _parts(tensors)
    return bool(parts) and all(p.device.type in TRITON_DEVICES for p in parts)


def usable(*tensors, triton: bool = True) -> bool:
    """True when the kernels may run on these tensors (None entries are ignored; a ``Segments``
    counts as its parts): all on CPU, contiguous, fp32 or uint8, and the library is built
    (building it if needed); or all on CUDA, contiguous, fp32 or uint8 (the first tensor, a codec's
    input, also bf16), and triton imports. ``triton=False``: the caller has no Triton kernel
    (top-k), CPU tensors only."""
    if not _enabled:
        return False
    gpu = on_triton(*tensors)
    if gpu and not triton:
        return False
    plain = (torch.float32, torch.uint8)
    for k, t in enumerate(tensors):
        dtypes = (*plain, torch.bfloat16) if gpu and k == 0 else plain
        if not all(p.is_contiguous() and p.dtype in dtypes and (gpu or p.device.type == "cpu") for p in _parts([t])):
            return False
    return triton_ready() if gpu else library() is not None


def serves(pieces: Pieces, *tensors) -> bool:
    """True when ``sign_serve`` takes these pieces and tensors: ``usable``, and on CPU pieces of at
    most ``LOCAL_MAX`` elements."""
    return usable(*tensors) and (on_triton(*tensors) or all(run[2] <= LOCAL_MAX for run in pieces.runs))


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // _MIN_PER_THREAD))


@functools.lru_cache(maxsize=1024)
def _runs(pieces: Pieces):
    flat = [v for run in pieces.runs for v in run]
    return (ctypes.c_int64 * max(1, len(flat)))(*flat), len(pieces.runs)


def _addr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _source(x):
    """(pointer, segment pointers, segment starts, count) of an input tensor or ``Segments``;
    the arrays must stay referenced until the call returns."""
    if not isinstance(x, Segments):
        return x.data_ptr(), None, None, 0
    n = len(x.parts)
    return (None, (ctypes.c_void_p * max(1, n))(*[p.data_ptr() for p in x.parts]),
            (ctypes.c_int64 * max(1, n))(*x.starts), n)


def _check(x, pieces: Pieces, *states: Optional[torch.Tensor]) -> None:
    if x.numel() != pieces.numel:
        raise ValueError(f"taciturn.kernels: {x.numel()} elements given for pieces of {pieces.numel}")
    for h in states:
        if h is not None and h.numel() != x.numel():
            raise ValueError(f"taciturn.kernels: a state or weight tensor of {h.numel()} elements for {x.numel()} "
                             "inputs")


def sign_scales(x, pieces: Pieces, scale: str, h: Optional[torch.Tensor] = None,
                alpha: float = 0.0) -> torch.Tensor:
    """The scale of every piece of y = x + alpha*h (mean |y| for "l1", sqrt(mean y^2) for "l2");
    x a tensor or ``Segments`` whose parts no piece straddles."""
    _check(x, pieces, h)
    if on_triton(x):
        from . import triton_sign
        return triton_sign.piece_scales(x, pieces, scale, h, alpha)
    out = torch.empty(pieces.count, dtype=torch.float32)
    runs, nruns = _runs(pieces)
    source = _source(x)
    library().tac_sign_scales(*source, _addr(h), alpha, runs, nruns, x.numel(), _SCALES[scale],
                              out.data_ptr(), _threads(x.numel()))
    return out


def _no_triton_weights(weights: Optional[torch.Tensor], *tensors) -> None:
    if weights is not None and on_triton(*tensors):
        raise ValueError("taciturn.kernels: the Triton kernels decode without weights; a weighted codec "
                         "(magnitude profile) runs its torch path on CUDA")


def sign_encode(x, pieces: Pieces, scale: str, payload: torch.Tensor, head: int, *,
                h: Optional[torch.Tensor] = None, alpha: float = 0.0, update: str = "none",
                scales: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write the sign payload of y = x + alpha*h into ``payload`` and update ``h`` in the same pass.

    ``payload[:head]`` gets the fp32 scales (unless ``scale`` is "none"), ``payload[head:]`` the
    packed signs; bytes after them are left alone. ``update``: "none", "markov" (h += C(y)) or
    "ef" (h = y - C(y)). ``scales`` (one per piece) replaces the computed ones. ``weights`` (one
    per element, CPU only): C(y) is decoded as (+-s) * weights for the update. x: a tensor or
    ``Segments`` whose parts no piece straddles.
    """
    _check(x, pieces, h, weights)
    _no_triton_weights(weights, x)
    if update != "none" and h is None:
        raise ValueError(f"taciturn.kernels: update={update!r} needs the state tensor h")
    if payload.numel() < head + packed_len(pieces.numel):
        raise ValueError(f"taciturn.kernels: payload of {payload.numel()} bytes is too small")
    if on_triton(x):
        from . import triton_sign
        return triton_sign.encode(x, pieces, scale, payload, head, h=h, alpha=alpha, update=update,
                                  scales=scales)
    if scales is not None:
        scales = scales.to(torch.float32).contiguous()
    runs, nruns = _runs(pieces)
    source = _source(x)
    library().tac_sign_encode(*source, _addr(h), alpha, _UPDATES[update], runs, nruns, x.numel(),
                              _SCALES[scale], _addr(scales), _addr(weights), payload.data_ptr(),
                              payload.data_ptr() + head, _threads(x.numel()))
    return payload


def sign_decode(payload: torch.Tensor, pieces: Pieces, scale: str, head: int,
                out: Optional[torch.Tensor] = None, accumulate: bool = False,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """C from a sign payload into ``out`` (allocated when None), or added to ``out``; with
    ``weights`` (one per element, CPU only) each element is (+-s) * weight."""
    if out is None:
        out = torch.empty(pieces.numel, dtype=torch.float32, device=payload.device)
    _check(out, pieces, weights)
    _no_triton_weights(weights, payload)
    if payload.numel() < head + packed_len(pieces.numel):
        raise ValueError(f"taciturn.kernels: payload of {payload.numel()} bytes is too small")
    if on_triton(payload):
        from . import triton_sign
        return triton_sign.decode(payload, pieces, scale, head, out, accumulate)
    runs, nruns = _runs(pieces)
    library().tac_sign_decode(payload.data_ptr(), payload.data_ptr() + head, runs, nruns, pieces.numel,
                              _SCALES[scale], _addr(weights), out.data_ptr(), int(accumulate),
                              _threads(pieces.numel))
    return out


def sign_serve(payloads: torch.Tensor, pieces: Pieces, scale: str, head: int, out: torch.Tensor, *,
               acc: Optional[torch.Tensor] = None, h: Optional[torch.Tensor] = None, alpha: float = 0.0,
               update: str = "none", weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The server phase in one pass per piece: a = mean of the decoded rows of ``payloads``
    (n, bytes), x = a, or ``acc += a`` and x = acc; then the payload of y = x + alpha*h into
    ``out`` with h updated as in ``sign_encode``, every decoding weighted by ``weights`` as there.
    On CPU pieces of at most ``LOCAL_MAX`` elements."""
    _no_triton_weights(weights, payloads)
    for t in (acc, h, weights):
        if t is not None and t.numel() != pieces.numel:
            raise ValueError(f"taciturn.kernels: state of {t.numel()} elements for pieces of {pieces.numel}")
    if update != "none" and h is None:
        raise ValueError(f"taciturn.kernels: update={update!r} needs the state tensor h")
    if min(payloads.shape[1], out.numel()) < head + packed_len(pieces.numel):
        raise ValueError("taciturn.kernels: payload too small for its pieces")
    if on_triton(payloads):
        from . import triton_sign
        return triton_sign.serve(payloads, pieces, scale, head, out, acc=acc, h=h, alpha=alpha, update=update)
    if pieces.count and max(run[2] for run in pieces.runs) > LOCAL_MAX:
        raise ValueError(f"taciturn.kernels: sign_serve takes pieces of at most {LOCAL_MAX} elements")
    n = payloads.shape[0]
    rows = [payloads[j].data_ptr() for j in range(n)]
    heads = (ctypes.c_void_p * n)(*rows)
    bits = (ctypes.c_void_p * n)(*[r + head for r in rows])
    runs, nruns = _runs(pieces)
    library().tac_sign_serve(heads, bits, n, runs, nruns, pieces.numel, _SCALES[scale], _addr(acc), _addr(h),
                             alpha, _UPDATES[update], _addr(weights), out.data_ptr(), out.data_ptr() + head,
                             _threads(pieces.numel))
    return out


def profile_weights(p: torch.Tensor, tensors: Pieces, blocks: Pieces, blocks_per_tensor: torch.Tensor,
                    floor: float, scale: str, out: torch.Tensor) -> torch.Tensor:
    """The magnitude profile's decode weights (``taciturn.profile.weights``) into ``out``: per
    block b of ``blocks`` (``blocks_per_tensor`` of them in each piece of ``tensors``),
    a = sqrt(p + floor * the mean of p over b's tensor), divided by its mean ("l1") or rms ("l2");
    1 where that is 0. CPU tensors only; the same for any thread count."""
    _check(p, blocks, out)
    _check(p, tensors)
    means = torch.empty(tensors.count, dtype=torch.float32)
    runs, nruns = _runs(tensors)
    library().tac_profile_means(p.data_ptr(), runs, nruns, means.data_ptr(), _threads(p.numel()))
    floors = means.mul_(floor).repeat_interleave(blocks_per_tensor)
    if floors.numel() != blocks.count:
        raise ValueError(f"taciturn.kernels: {floors.numel()} floors for {blocks.count} blocks")
    runs, nruns = _runs(blocks)
    library().tac_profile_weights(p.data_ptr(), runs, nruns, p.numel(), floors.data_ptr(), _SCALES[scale],
                                  out.data_ptr(), _threads(p.numel()))
    return out
