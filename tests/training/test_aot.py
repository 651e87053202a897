"""Ahead-of-time compile (compile mode, pal_jax/training/aot.py): topology names, the CPU path on the 8 fake devices, and
the TPU path through libtpu's topology description where libtpu is installed (.venv-tpu, requirements-tpu.txt)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO
from pal_jax.training import aot
from pal_jax.model.spec import ModelSpec, model_config

# Cheaper CPU codegen: the memory figures do not depend on it (checked: identical bytes), the compile time halves.
FAST_CPU = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_config(**overrides):
    spec = importlib.util.spec_from_file_location("pal_compile_config", REPO / "configs" / "compile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    items = {"model.d_model": 64, "model.n_layers": 1, "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 128,
             "tokenizer.train_vocab_size": 256, "compile.seq_len": 32, "train.batch_size": 8,
             "stage2.batch_size": 4, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    items.update({k.replace("__", "."): v for k, v in overrides.items()})
    for key, value in items.items():
        section, _, name = key.rpartition(".")
        c[section][name] = value
    return c


def test_topology_names():
    t = aot.parse_topology("v5p-64")  # 64 TensorCores = 32 chips
    assert (t.topology_name, t.chips, t.chip_config_name, t.generation) == ("v5p:2x4x4", 32, "megacore", "v5p")
    t = aot.parse_topology("v5e-256")  # v5e counts chips
    assert (t.topology_name, t.chips, t.chip_config_name) == ("v5e:16x16", 256, "default")
    assert aot.parse_topology("v4-32").topology_name == "v4:2x2x4" and aot.parse_topology("v4-32").chips == 16
    assert aot.parse_topology("v6e-64").topology_name == "v6e:8x8"
    t = aot.parse_topology("v5p:4x4x8")
    assert t.chips == 128 and t.chips_per_host_bounds == (2, 2, 1)
    assert aot.parse_topology("v5e-1").chips_per_host_bounds == (1, 1, 1)
    assert aot.HBM_GIB == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
    with pytest.raises(ValueError, match="no standard shape known"):
        aot.parse_topology("v5p-48")
    with pytest.raises(ValueError, match="expected an accelerator name"):
        aot.parse_topology("tpu64")
    with pytest.raises(ValueError, match="2D"):
        aot.parse_topology("v5e:2x2x2")


def test_compile_mode_registered():
    import importlib

    from pal_jax import config as config_lib
    assert config_lib.MODES["compile"] == ("pal_jax.training.aot", "run_compile")
    for mode, (module, fn) in config_lib.MODES.items():  # every mode's entry point exists (main.dispatch runs it)
        assert callable(getattr(importlib.import_module(module), fn)), mode
    config_lib.validate(compile_config())


def test_optimizer_state_sharded_like_params():
    """Adam's mu and nu take their params' shardings (jit(tx.init)'s own output shardings are all replicated),
    also under the frozen-params mask; step counts replicated."""
    import jax
    from jax.sharding import PartitionSpec as P

    from pal_jax.core import mesh as mesh_lib
    from pal_jax.core import optim
    from pal_jax.training import loop as train
    c = compile_config(**{"mesh.data": 1, "mesh.fsdp": 4})
    ms = ModelSpec(model_config(c.model, 256), _cpu_mesh(c), mesh_lib.axis_rules(c))
    want = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(ms.shardings)[0]}
    assert want["['embed']"] == P("tensor", "fsdp")
    for trainable in (None, lambda path, x: "embed" not in jax.tree_util.keystr(path)):
        sh = train.optimizer_shardings(optim.make_optimizer(c.train, trainable), ms)
        got = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
        for moment in ("mu", "nu"):
            leaves = {k.split(f".{moment}", 1)[1]: v for k, v in got.items() if f".{moment}[" in k}
            expect = {k: v for k, v in want.items() if trainable is None or "embed" not in k}
            assert leaves == expect
        assert all(v == P() for k, v in got.items() if k.endswith(".count"))


def test_cpu_compile_stage1_and_stage2(tmp_path, capsys):
    """Both train steps compile on a 2x2x2 mesh of the fake CPU devices; memory_analysis gives positive bytes."""
    summary = aot.run_compile(compile_config(**{"compile.topology": "cpu"}), str(tmp_path), compiler_options=FAST_CPU)
    out = capsys.readouterr().out
    assert "| stage1 | 8 | 8 x 32 | 32 |" in out and "| stage2 | 4 pairs | 8 x 32 | 32 |" in out
    assert "| fits | TFLOP | accessed |" in out and "attention xla" in out
    report = json.loads((tmp_path / "compile_cpu.json").read_text())
    assert (tmp_path / "compile_cpu.md").read_text() in out
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and report["devices"] == 8
    rows = {r["stage"]: r for r in report["stages"]}
    assert set(rows) == {"stage1", "stage2"} and summary["stage1"].endswith("GiB per device")
    for r in rows.values():
        b = r["bytes"]
        assert b["arguments"] > 0 and b["outputs"] > 0 and b["temp"] > 0 and b["total"] > 0
        assert b["alias"] > 0  # params and optimizer state are donated
        assert r["fits"] == "n/a"
        assert r["flops_per_device"] > 0 and r["bytes_accessed_per_device"] > 0  # XLA's cost analysis
    # Stage 2 takes the reference params as one more (non-donated) argument and runs 2x rows per pair
    assert rows["stage2"]["reference"] and not rows["stage1"]["reference"]
    assert rows["stage2"]["bytes"]["arguments"] > rows["stage1"]["bytes"]["arguments"]


def test_cpu_compile_stage2_with_shared_prompt_rows(tmp_path, capsys):
    """stage2.share_prompt compiles as the run trains it: one row per pair (4 x 32, not 8 x 32)."""
    cfg = compile_config(**{"compile.topology": "cpu", "compile.stages": "stage2", "stage2.share_prompt": True})
    aot.run_compile(cfg, str(tmp_path), compiler_options=FAST_CPU)
    assert "| stage2 | 4 pairs | 4 x 32 | 32 |" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "compile_cpu.json").read_text())["stages"]
    assert row["rows"] == 4 and row["flops_per_device"] > 0
    # stage2.flat_window compiles at its widest (every row's window full): the same head rows, a gathered list
    flat = aot.compile_stage("stage2", compile_config(**{"stage2.share_prompt": True, "stage2.flat_window": True}),
                             _cpu_mesh(), 32, 256, compiler_options=FAST_CPU, window=16)
    assert flat["rows"] == 4 and flat["target_window"] == 16 and flat["flops_per_device"] > 0


def test_bad_compile_settings_name_their_key(tmp_path):
    with pytest.raises(ValueError, match="config.compile.stages"):
        aot.run_compile(compile_config(**{"compile.topology": "cpu", "compile.stages": "stage3"}), str(tmp_path))
    with pytest.raises(ValueError, match=r"config.stage2.batch_size = 3: expected a multiple of"):
        aot.compile_stage("stage2", compile_config(**{"stage2.batch_size": 3}), _cpu_mesh(), 32, 256)


def _cpu_mesh(config=None):
    from pal_jax.core import mesh as mesh_lib
    return mesh_lib.make_mesh((config or compile_config()).mesh)


@pytest.mark.skipif(not aot.libtpu_available(), reason=aot.LIBTPU_MISSING)
def test_tpu_topology_compile(tmp_path, monkeypatch):
    """Stage 1 and Stage 2 compiled for a v5p-16 (8 chips) from this CPU machine; HBM 95 GiB per chip."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another compile may hold libtpu's lockfile; no TPU here
    c = compile_config(**{"compile.topology": "v5p-16"})
    aot.run_compile(c, str(tmp_path))
    report = json.loads((tmp_path / "compile_v5p-16.json").read_text())
    assert report["devices"] == 8 and report["device_kind"].startswith("TPU v5") and report["hbm_gib"] == 95
    for r in report["stages"]:
        assert r["bytes"]["total"] > 0 and r["fits"] == "yes"


@pytest.mark.skipif(not aot.libtpu_available(), reason=aot.LIBTPU_MISSING)
def test_tpu_splash_attention_compiles_per_device(tmp_path, monkeypatch):
    """model.attention='splash' for a v5p-16 (8 chips, mesh 2x2x2): the kernel runs compiled (not interpreted) in
    shard_map on each chip's rows (data x fsdp) and heads (tensor), and the step compiles. XLA's cost analysis does
    not look into the Pallas kernel, so the step's FLOPs count less than xla's (whose attention is einsums)."""
    from pal_jax.model import transformer
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    seen = []
    local = transformer._splash_local

    def spy(q, k, v, *segs, **kw):
        seen.append((q.shape, k.shape, kw["interpret"]))
        return local(q, k, v, *segs, **kw)

    monkeypatch.setattr(transformer, "_splash_local", spy)
    rows = {}
    for attention in ("xla", "splash"):
        c = compile_config(**{"compile.topology": "v5p-16", "compile.stages": "stage1", "compile.seq_len": 128,
                              "model.max_len": 128, "model.attention": attention})
        aot.run_compile(c, str(tmp_path / attention))
        (rows[attention],) = json.loads((tmp_path / attention / "compile_v5p-16.json").read_text())["stages"]
    assert seen and set(seen) == {((2, 128, 2, 16), (2, 128, 1, 16), False)}  # 8 rows / 4, 4 heads / 2, 2 / 2
    assert rows["splash"]["fits"] == "yes" and rows["splash"]["bytes"]["total"] > 0
    assert 0 < rows["splash"]["flops_per_device"] < rows["xla"]["flops_per_device"]


def test_tpu_topology_without_libtpu_says_how_to_install(tmp_path):
    if aot.libtpu_available():
        pytest.skip("libtpu is installed here (the message is for venvs without it)")
    with pytest.raises(RuntimeError, match=r"libtpu not installed: pip install -r requirements-tpu.txt"):
        aot.run_compile(compile_config(**{"compile.topology": "v5p-8"}), str(tmp_path))


@pytest.mark.skipif(not aot.libtpu_available(), reason=aot.LIBTPU_MISSING)
def test_tpu_compile_over_hbm_is_reported_not_raised(tmp_path, monkeypatch):
    """A step the TPU compiler refuses for its HBM (v5e: 16 GiB) is a 'fits: no' row with XLA's message."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    c = compile_config(**{"compile.topology": "v5e-4", "compile.stages": "stage1", "compile.seq_len": 8192,
                          "model.max_len": 8192, "tokenizer.train_vocab_size": 65536, "train.batch_size": 64,
                          "mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1})
    summary = aot.run_compile(c, str(tmp_path))
    (row,) = json.loads((tmp_path / "compile_v5e-4.json").read_text())["stages"]
    assert row["fits"] == "no" and row["bytes"] is None and "RESOURCE_EXHAUSTED" in row["error"]
    assert summary["stage1"].startswith("does not fit 16 GiB HBM")


@pytest.mark.slow  # two real-shaped models, four CPU compiles: about 5 minutes
@pytest.mark.parametrize("preset,n_params", [("qwen2_5_0_5b", 494_032_768), ("llama3_2_1b", 1_235_814_400)])
def test_real_checkpoint_presets_compile_on_cpu(preset, n_params):
    """Qwen2.5-0.5B and Llama-3.2-1B (abstract shapes, no weights) lower and compile both train steps on the 8 fake
    CPU devices (fsdp 8); each device holds its share of the float32 params and Adam moments (Stage 2: + the
    reference). The TPU-topology figures for these presets: docs/scale.md."""
    spec = importlib.util.spec_from_file_location("pal_compile_config", REPO / "configs" / "compile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(preset)
    for key, value in {"compile.seq_len": 64, "train.batch_size": 8, "stage2.batch_size": 8, "mesh.data": 1,
                       "mesh.fsdp": 8, "mesh.tensor": 1, "model.dtype": "bfloat16", "model.remat": True}.items():
        section, _, name = key.rpartition(".")
        c[section][name] = value
    mesh = _cpu_mesh(c)
    share = n_params * 4 / 8  # one float32 copy of the params, split over the 8 devices
    for stage, copies in (("stage1", 3), ("stage2", 4)):  # params + mu + nu (+ the Stage 2 reference)
        r = aot.compile_stage(stage, c, mesh, 64, int(c.model.vocab_size), compiler_options=FAST_CPU)
        b = r["bytes"]
        assert copies * share <= b["arguments"] <= 1.05 * copies * share + 2**24, (stage, b)
        assert b["temp"] > 0 and b["alias"] > 0
