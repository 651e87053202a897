"""config.compile_cache: off, a directory, auto (pal_jax/core/compile_cache.py). Every cache here lives under tmp_path."""
import json
import logging
import os
import subprocess
import sys

from conftest import REPO
from pal_jax.core import compile_cache


def test_off_values_leave_jax_config_alone(caplog):
    import jax
    before = jax.config.jax_compilation_cache_dir
    caplog.set_level(logging.INFO)
    for value in ("off", "", " OFF "):
        assert compile_cache.resolve(value, env={}) is None
        assert compile_cache.setup(value, env={}) is None
    assert jax.config.jax_compilation_cache_dir == before  # not set (the suite runs with the cache off)
    assert "compile cache: off" in caplog.text


def test_auto_resolves_under_xdg_cache_home_else_home(tmp_path):
    xdg = str(tmp_path / "xdg")
    assert compile_cache.resolve("auto", env={"XDG_CACHE_HOME": xdg}) == os.path.join(xdg, "pal_jax", "jax_cache")
    home_default = os.path.join(os.path.expanduser("~"), ".cache", "pal_jax", "jax_cache")
    assert compile_cache.resolve("auto", env={}) == home_default
    assert compile_cache.resolve("auto", env={"XDG_CACHE_HOME": "relative/dir"}) == home_default  # XDG: ignored
    assert compile_cache.resolve("auto", env={"XDG_CACHE_HOME": xdg, "JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"
    assert compile_cache.resolve(str(tmp_path / "c"), env={}) == str(tmp_path / "c")
    assert compile_cache.resolve("gs://bucket/cache", env={}) == "gs://bucket/cache"


def test_unwritable_dir_warns_once_and_goes_on(tmp_path, caplog):
    import jax
    before = jax.config.jax_compilation_cache_dir
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    caplog.set_level(logging.INFO)
    assert compile_cache.setup(str(blocker / "cache"), env={}) is None  # its parent is a file: cannot be created
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "going on without the cache" in warnings[0].getMessage()
    assert jax.config.jax_compilation_cache_dir == before


def test_off_overrides_jax_compilation_cache_dir_from_the_environment(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.config.jax_compilation_cache_dir); "
                          "from pal_jax.core import compile_cache; compile_cache.setup('off'); "
                          "print(jax.config.jax_compilation_cache_dir)"], cwd=REPO,
                         env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "j")},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(tmp_path / "j"), "None"]


def test_compile_mode_runs_without_the_cache(tmp_path):
    assert compile_cache.setup(str(tmp_path / "c"), mode="compile", env={}) is None
    assert not (tmp_path / "c").exists()


# A fresh process: JAX decides at its first compile whether it uses a cache, once per process.
PROBE = """
import json, os, sys
from pal_jax.core import compile_cache
path = compile_cache.setup(sys.argv[1])
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the threshold is not under test here
from jax._src import monitoring
events = []
monitoring.register_event_listener(lambda e, **kw: events.append(e))
f = jax.jit(lambda x: sum(jnp.sin(x * i) @ jnp.cos(x.T + i) for i in range(60)).sum())
print(json.dumps({"path": path, "value": float(f(jnp.ones((16, 16)))),
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def _probe(value, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", PROBE, value], cwd=REPO, env={**env, **env_extra},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(path):
    return sorted(n for n in os.listdir(path) if n.endswith("-cache"))


def test_a_directory_gets_the_compiled_program_and_a_second_process_reads_it(tmp_path):
    cache = tmp_path / "cache"
    first = _probe(str(cache), {})
    assert first["path"] == str(cache) and first["hits"] == 0
    entries = _entries(cache)
    assert any(n.startswith("jit__lambda") for n in entries), entries
    second = _probe(str(cache), {})  # the CPU backend reloads its own executables on this host
    assert second["hits"] >= 1 and second["value"] == first["value"]
    assert _entries(cache) == entries  # nothing new written


def test_auto_writes_under_xdg_cache_home(tmp_path):
    out = _probe("auto", {"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert out["path"] == str(tmp_path / "xdg" / "pal_jax" / "jax_cache")
    assert any(n.startswith("jit__lambda") for n in _entries(out["path"]))


def test_config_key_defaults_to_auto_and_the_suite_to_off():
    from configs import common
    from helpers import tiny_config
    from pal_jax.config import validate
    assert common.base_config("stage1", "tiny").compile_cache == "auto"
    c = tiny_config()
    assert c.compile_cache == "off"  # tests/helpers.TINY_OVERRIDES: no test writes to ~/.cache
    validate(c)


def test_main_sets_the_cache_up_before_the_first_compile(tmp_path):
    from helpers import run_main
    cache = tmp_path / "cache"
    r = run_main(tmp_path / "w", {"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
                                  "compile_cache": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"compile cache: {cache} " in r.stderr
    assert any(n.startswith("jit_step-") for n in _entries(cache))  # the train step
    # config.host_malloc (auto; run_main sets JAX_PLATFORMS=cpu) was set before the backend started, too
    assert "host malloc: one arena, no mmap, freed memory kept for reuse (config.host_malloc = 'auto')" in r.stderr
