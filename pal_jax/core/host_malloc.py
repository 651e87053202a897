"""glibc malloc settings for runs on the XLA:CPU backend (config.host_malloc), set once at startup, before any JAX
backend starts.

Why. An XLA:CPU executable allocates one buffer for all its temporaries at every call, on the backend's worker
threads. glibc gives each such thread its own arena, whose heaps hold at most 64 MiB, and serves a larger request
(and, by default, any over its mmap threshold, at most 32 MiB) with a fresh mmap that free() unmaps again. So every
training step faulted its whole temporary buffer back in, page by page: the tiny pipeline's Stage 1 step took ~25,000
minor page faults (~100 MB) on its 2 CPU devices, and the README main job 34 million, 70 s of kernel time on 2 cores
(benchmarks/README.md, section 10).

    "keep"  mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, -1): every thread
            allocates from the main arena's heap, nothing is mmap'd, and freed memory stays in the process for the
            next call to reuse. The resident size stays at its peak (the main job's maximum: 1.28-1.38 GB; 1.27-1.30
            GB with "off"), and threads share one arena's lock (XLA:CPU allocates a few buffers per call; a host
            running many allocating threads, e.g. a large checkpoint's writers, contends more).
    "auto"  "keep" when the run's devices will be CPUs (JAX_PLATFORMS names cpu first, or it is unset and neither
            libtpu nor a jax_plugins accelerator plugin is installed), else "off": on TPU and GPU the step's
            temporaries are device memory, not malloc's.
    "off"   glibc's defaults.

Results do not change (only where freed host memory goes). Not glibc (musl, macOS): nothing is set, one log line
says so. After a JAX backend has started its threads already have their arenas, so the setting would not reach them:
setup() then logs that and sets nothing (call it first, as pal_jax.main does).
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform

VALUES = ("auto", "keep", "off")
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# trim threshold -1: no trimming at all (mallopt's int; 2**31 - 1 still trimmed a free top chunk over 2 GiB, which the
# 135M Stage 2 step's temporaries reach: it then faulted 4.8M pages in its benchmark run and was slower than "off")
KEEP = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def cpu_run(env=None, find_spec=importlib.util.find_spec) -> bool:
    """Whether JAX will run on CPU devices: JAX_PLATFORMS names cpu first; or it is unset and neither libtpu nor a
    jax_plugins package (where the CUDA and ROCm plugins install) is present."""
    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return find_spec("libtpu") is None and find_spec("jax_plugins") is None


def normalized(value) -> str:
    """config.host_malloc as read: stripped, lower case (one of VALUES when valid; config validation checks that)."""
    return str(value).strip().lower()


def glibc() -> bool:
    """Whether this process runs on glibc (Linux), whose mallopt the "keep" settings are."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def resolve(value, env=None, find_spec=importlib.util.find_spec) -> bool:
    """config.host_malloc -> whether to keep freed memory ("keep", or "auto" on a CPU run). ValueError otherwise."""
    value = normalized(value)
    if value not in VALUES:
        raise ValueError(f"host_malloc = {value!r}: expected one of {VALUES}")
    return value == "keep" or (value == "auto" and cpu_run(env, find_spec))


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without it: assume not started
        return False


def setup(value, env=None) -> bool:
    """Apply config.host_malloc; -> True when the "keep" settings were set. Call before any JAX backend starts."""
    if not resolve(value, env):
        logging.info("host malloc: glibc defaults (config.host_malloc = %r)", value)
        return False
    if not glibc():
        logging.info("host malloc: not glibc (%s %s); nothing to set (config.host_malloc = %r)", platform.system(),
                     platform.libc_ver()[0] or "libc", value)
        return False
    if _backend_started():
        logging.warning("host malloc: a JAX backend has already started, its threads keep their own arenas; "
                        "nothing set (config.host_malloc = %r: pal_jax.main sets it first)", value)
        return False
    libc = ctypes.CDLL(None)
    failed = [param for param, v in KEEP if libc.mallopt(param, v) != 1]
    if failed:
        logging.warning("host malloc: mallopt refused parameters %s (config.host_malloc = %r)", failed, value)
        return False
    logging.info("host malloc: one arena, no mmap, freed memory kept for reuse (config.host_malloc = %r)", value)
    return True
