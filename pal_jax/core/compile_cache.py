"""The persistent XLA compilation cache (config.compile_cache), set up once at startup before anything compiles.

JAX writes each compiled program (the executable, serialised) to a directory and reads it back in any later process
that compiles the same program: a rerun of the same command compiles none of the model's programs again (train steps,
decoding, scoring), and a run of another mode reuses the programs it shares. (Within one process JAX's in-memory
cache already serves a repeated program: in the tiny pipeline, Stage 2's evaluation compiles nothing after Stage
1's.) The cache key is a hash of the program itself, the jax/jaxlib version, the backend, XLA_FLAGS, the compile
options and the devices' topology (their count included), so a hit runs the executable the compiler would have
produced; a changed program, device count or flag is a miss.

    "auto"       $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/pal_jax/jax_cache (~/.cache/pal_jax/jax_cache)
    "" or "off"  no persistent cache (also when $JAX_COMPILATION_CACHE_DIR is set)
    other        that directory (created if missing; an etils.epath URL such as gs://... is passed to JAX as is)

A directory that cannot be created or written to gives one warning and the run goes on without the cache. JAX
itself turns a failed read or write of an entry into a warning and compiles. The directory has no size limit:
delete it to clear it. Only trust a directory no one else can write to (an entry is code that JAX runs).
"""
from __future__ import annotations

import logging
import os
import tempfile

OFF = ("", "off")
# Programs that compile in less than this are not written (JAX's default is 1 s). In a short tiny pipeline run on
# the shared 2-core CPU (JAX_LOG_COMPILES=1) the model's programs took 0.8 s (all_finite) to 24 s (a Stage 2
# step), decoding and scoring 2-4 s, the encoder's embed 1.3-1.5 s: on a faster or idle machine several fall under
# 1 s. The eager ops' one-op programs (slices, casts, PRNG) took 0.01-0.3 s; most stay out.
MIN_COMPILE_TIME_S = 0.1


def resolve(value, env=None) -> str | None:
    """config.compile_cache -> the cache directory, or None for off."""
    env = os.environ if env is None else env
    value = str(value).strip()
    if value.lower() in OFF:
        return None
    if value.lower() == "auto":
        if env.get("JAX_COMPILATION_CACHE_DIR"):  # the user's own JAX setting wins
            return env["JAX_COMPILATION_CACHE_DIR"]
        base = env.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):  # unset, or relative (the XDG spec says to ignore it then)
            base = os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "pal_jax", "jax_cache")
    return value if "://" in value else os.path.abspath(os.path.expanduser(value))


def _check_writable(path: str) -> None:
    """Create `path` and write (then remove) a file in it; OSError when either fails."""
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".pal_jax_write_test_", dir=path)
    os.close(fd)
    os.remove(probe)


def setup(value, mode: str = "", env=None) -> str | None:
    """Point JAX's persistent compilation cache at resolve(value); -> the directory, or None (off or unusable).

    Off in compile mode, whatever the value: its report times the compiler (pal_jax/training/aot.py). Call before the first
    compilation: JAX decides once per process, at its first compile, whether it uses a cache."""
    if mode == "compile":
        logging.info("compile cache: off in compile mode (its report times the compiler)")
        return None
    path = resolve(value, env)
    if path is None:
        import jax
        if jax.config.jax_compilation_cache_dir:  # JAX read $JAX_COMPILATION_CACHE_DIR at import: off means off
            jax.config.update("jax_compilation_cache_dir", None)
        logging.info("compile cache: off (config.compile_cache = %r)", value)
        return None
    if "://" not in path:
        try:
            _check_writable(path)
        except OSError as e:
            logging.warning("compile cache: %s is not writable (%s); going on without the cache "
                            "(config.compile_cache = %r; 'off' silences this)", path, e, value)
            return None
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    logging.info("compile cache: %s (config.compile_cache = %r; programs compiling in >= %g s are kept)", path, value,
                 MIN_COMPILE_TIME_S)
    return path
