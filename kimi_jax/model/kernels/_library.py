"""Finding, loading and configuring the compiled kernels; registering them with XLA once.

Settings (environment, read once when the library is first needed):

* ``KIMI_JAX_KERNELS=off`` forces the XLA path (the kernels report themselves unavailable).
* ``KIMI_JAX_KERNEL_ISA=avx512|avx2|portable`` picks the instruction set (default: the best the CPU
  has). One the CPU lacks makes the kernels unavailable, with that reason.
* ``KIMI_JAX_KERNEL_THREADS=n`` threads over output rows (default: the CPUs this process may use).
* ``KIMI_JAX_KERNEL_POOL=xla|own|none``: XLA's intra-op thread pool (default: the threads XLA runs
  its own CPU kernels on, so nothing else spins or competes for the cores between kernel calls), our
  own worker threads, or the calling thread alone (``benchmarks/cpu_kernels.py`` measures all three).
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.machinery
import os
import threading
from pathlib import Path

ISAS = ("portable", "avx2", "avx512")  # index = the library's ISA code
POOLS = ("none", "own", "xla")
ABI_VERSION = 1  # must match kAbiVersion in src/common.h
TARGETS = {
    "kimi_jax_int4_linear": "KimiJaxInt4Linear",
    "kimi_jax_fp8_linear": "KimiJaxFp8Linear",
    "kimi_jax_bf16_linear": "KimiJaxBf16Linear",
    "kimi_jax_routed_experts": "KimiJaxRoutedExperts",
}
# With our own pool: idle workers spin this long after a call before they sleep (the calls of one
# decode step come back to back; waking a sleeping thread costs tens of microseconds on a busy VM).
SPIN_US = 200
# Weights below this many bytes are multiplied on the calling thread alone (waking a helper costs
# more than it saves), and each task of a threaded call covers about TASK_BYTES of weights.
MIN_PARALLEL_BYTES = 256 << 10
TASK_BYTES = 64 << 10


@dataclasses.dataclass(frozen=True)
class Library:
    available: bool
    reason: str | None = None  # why not, when not
    isa: str | None = None
    threads: int = 1
    pool: str = "xla"
    kernel_set_version: int | None = None
    supported_isas: tuple[str, ...] = ()
    path: str | None = None


_lock = threading.Lock()
_state: Library | None = None


def library_path() -> Path | None:
    """The compiled library next to this file (built by ``pip install -e .`` / setup.py), if any."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_kimi_jax_kernels{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _env_choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"${name}: expected one of {', '.join(choices)}, found {value!r}")
    return value


def _env_threads() -> int:
    value = os.environ.get("KIMI_JAX_KERNEL_THREADS", "").strip()
    if not value:
        return _default_threads()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"$KIMI_JAX_KERNEL_THREADS: expected a positive integer, found {value!r}")
    return int(value)


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _load() -> Library:
    if os.environ.get("KIMI_JAX_KERNELS", "").strip().lower() in ("off", "0", "false", "no"):
        return Library(False, "KIMI_JAX_KERNELS=off")
    path = library_path()
    if path is None:
        return Library(False, "the compiled kernels are not installed (no C++ compiler at install time? "
                              "reinstall with `pip install -e .` to build them)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return Library(False, f"{path.name} could not be loaded: {e}")
    try:
        abi = lib.kimi_jax_abi_version()
    except AttributeError:
        return Library(False, f"{path.name} is not the kimi-jax kernel library")
    if abi != ABI_VERSION:
        return Library(False, f"{path.name} was built for ABI {abi}, this code needs {ABI_VERSION}: rebuild it "
                              "(`pip install -e .`)")
    mask = lib.kimi_jax_supported_isas()
    supported = tuple(name for i, name in enumerate(ISAS) if mask & (1 << i))
    try:
        isa = _env_choice("KIMI_JAX_KERNEL_ISA", ISAS, supported[-1])
        pool = _env_choice("KIMI_JAX_KERNEL_POOL", POOLS, "xla")
        threads = _env_threads()
    except ValueError as e:
        return Library(False, str(e))
    if isa not in supported:
        return Library(False, f"KIMI_JAX_KERNEL_ISA={isa}, but this CPU or build offers only {', '.join(supported)}")
    lib.kimi_jax_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.kimi_jax_configure(max(1, threads), POOLS.index(pool), SPIN_US, MIN_PARALLEL_BYTES, TASK_BYTES)
    import jax  # noqa: PLC0415 (the wrappers need JAX anyway; only the registration happens here)

    try:
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        _self_test(ISAS.index(isa))
    except Exception as e:  # noqa: BLE001 (any failure here means: use the XLA path, and say why)
        return Library(False, f"the kernels did not run under this jaxlib: {e}")
    return Library(True, None, isa, max(1, threads), pool, int(lib.kimi_jax_kernel_set_version()), supported,
                   str(path))


def _self_test(isa: int) -> None:
    """One tiny product through XLA: a library built against another jaxlib's FFI fails here, at load,
    rather than in the middle of a run."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    x = np.arange(1.0, 4.0, dtype=np.float32).reshape(1, 3)
    w = np.array([[1.0, 2.0, -0.5]], np.float32)
    call = jax.ffi.ffi_call("kimi_jax_bf16_linear", jax.ShapeDtypeStruct((1, 1), np.float32))
    with jax.ensure_compile_time_eval():  # first use may come while a caller's function is being traced
        y = np.asarray(call(x, jax.numpy.asarray(w, jax.numpy.bfloat16), isa=np.int64(isa)))
    if y.tolist() != [[3.5]]:
        raise RuntimeError(f"self-test product gave {y.tolist()}, expected [[3.5]]")


def library() -> Library:
    """The library's state, loaded and registered on first use (thread-safe, once per process)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state
