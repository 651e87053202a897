"""config.host_malloc (pal_jax/core/host_malloc.py): which runs keep freed memory, the refusals, and the effect itself
in fresh processes: the minor page faults of a jitted call whose temporary buffer is 64 MiB."""
import json
import logging
import subprocess
import sys

import pytest

from conftest import REPO
from helpers import tiny_config
from pal_jax.config import validate
from pal_jax.core import host_malloc
from pal_jax.core.errors import ConfigError


def _spec(installed):
    return lambda name: object() if name in installed else None


def test_auto_keeps_on_cpu_runs_only():
    none = _spec(())
    assert host_malloc.resolve("auto", env={"JAX_PLATFORMS": "cpu"}, find_spec=_spec(("libtpu",)))  # named: wins
    assert not host_malloc.resolve("auto", env={"JAX_PLATFORMS": "tpu,cpu"}, find_spec=none)  # cpu is a fallback
    assert not host_malloc.resolve("auto", env={"JAX_PLATFORMS": "cuda"}, find_spec=none)
    # unset: CPU unless an accelerator's package is installed (libtpu; the CUDA/ROCm plugins live in jax_plugins)
    assert host_malloc.cpu_run(env={}, find_spec=none) is True
    assert host_malloc.cpu_run(env={}, find_spec=_spec(("libtpu",))) is False
    assert host_malloc.cpu_run(env={}, find_spec=_spec(("jax_plugins",))) is False
    assert host_malloc.resolve(" KEEP ", env={"JAX_PLATFORMS": "tpu"}, find_spec=none)  # keep: always
    assert not host_malloc.resolve("off", env={"JAX_PLATFORMS": "cpu"}, find_spec=none)


def test_bad_values_are_refused_by_name():
    with pytest.raises(ValueError, match=r"host_malloc = 'mmap': expected one of \('auto', 'keep', 'off'\)"):
        host_malloc.resolve("mmap", env={})
    with pytest.raises(ConfigError, match=r"host_malloc = 'always'.*one of \('auto', 'keep', 'off'\)"):
        validate(tiny_config(host_malloc="always"))
    validate(tiny_config(host_malloc=" Keep "))  # what resolve accepts, validation accepts


def test_sets_nothing_once_a_backend_runs(caplog):
    import jax
    jax.devices()  # this process's backend is up (the suite's conftest set it up), with its threads' arenas
    caplog.set_level(logging.INFO)
    assert host_malloc.setup("keep", env={}) is False
    assert "a JAX backend has already started" in caplog.text
    caplog.clear()
    assert host_malloc.setup("off", env={}) is False
    assert "glibc defaults" in caplog.text


# a fresh process: host_malloc.setup(MODE) before JAX starts, then a jitted call whose 64 MiB temporary (the
# [2048, 8192] float32 product) is allocated at every call; prints the minor page faults of calls 17..32 (in the first
# calls a kept heap still grows: a call's temporary can be allocated before the last one's is freed)
PROBE = """
import json, resource, sys
from pal_jax.core import host_malloc
applied = host_malloc.setup(sys.argv[1], env={"JAX_PLATFORMS": "cpu"})
import jax, jax.numpy as jnp
x = jnp.ones((2048, 128), jnp.float32) * 0.01
w = jnp.ones((128, 8192), jnp.float32) * 0.01
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w), axis=1) + jnp.max(x @ w, axis=1))
for _ in range(16):
    f(x, w).block_until_ready()
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "out": float(out[0])}))
"""


def _probe(mode: str) -> dict:
    env = {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_malloc.glibc(), reason="glibc's mallopt only")
def test_keep_stops_refaulting_the_temporaries():
    off, keep = _probe("off"), _probe("keep")
    assert off["applied"] is False and keep["applied"] is True
    assert keep["out"] == off["out"]  # the same numbers
    # glibc's defaults: the 64 MiB temporary is a fresh mmap at each call, faulted in page by page (16384 pages)
    assert min(off["faults"]) > 8000, off
    # kept: its pages are reused; at most a late growth of the heap faults a call's worth in
    assert sum(keep["faults"]) < 0.25 * sum(off["faults"]), (keep, off)
