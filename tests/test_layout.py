"""The package's layering (scripts/import_graph.py) and the behaviour-unchanged check (scripts/compare_metrics.py)."""
import importlib.util
import json
import subprocess
import sys

from conftest import REPO


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_loops_and_no_upward_imports():
    g = _script("import_graph")
    known = g.modules(str(REPO))
    edges = {m: g.imports(p, m, known) for m, p in known.items()}
    assert "pal_jax.training.loop" in known and "pal_jax.weights.restore" in known
    assert g.sccs({m: {t for t, _, _ in e} for m, e in edges.items()}) == []
    upward = [(m, t) for m, e in edges.items() for t, _, _ in e if g.layer(t) > g.layer(m)]
    assert upward == []
    # in-function imports only for optional dependencies (the TFDS reader needs tensorflow-datasets)
    inner = {(m, t) for m, e in edges.items() for t, _, top in e if not top}
    assert inner == {("pal_jax.data.corpus", "pal_jax.data.tfds_builder")}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "import_graph.py"), f"--root={REPO}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "import loops (strongly connected components): 0" in out.stdout


def test_the_layering_check_sees_a_loop_and_an_upward_import(tmp_path):
    g = _script("import_graph")
    for d in ("pal_jax/core", "pal_jax/training"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "pal_jax" / "__init__.py").write_text("")
    (tmp_path / "pal_jax/core/a.py").write_text("from pal_jax.training import b\n")  # core -> training: upward
    (tmp_path / "pal_jax/training/b.py").write_text("def f():\n    from pal_jax.core import a\n")  # closes a loop
    known = g.modules(str(tmp_path))
    edges = {m: g.imports(p, m, known) for m, p in known.items()}
    assert g.sccs({m: {t for t, _, _ in e} for m, e in edges.items()}) == [["pal_jax.core.a", "pal_jax.training.b"]]
    assert [(m, t) for m, e in edges.items() for t, _, _ in e if g.layer(t) > g.layer(m)] == [
        ("pal_jax.core.a", "pal_jax.training.b")]


def test_compare_metrics_skips_timings_and_names_what_differs(tmp_path):
    c = _script("compare_metrics")
    a = {"results": {"s1": {"f1": 0.5, "seconds": 3.0, "ppl": float("nan")}}, "info": {"checkpoints": {"s1": "/a"}}}
    b = {"results": {"s1": {"f1": 0.5, "seconds": 9.0, "ppl": float("nan")}}, "info": {"checkpoints": {"s1": "/b"}}}
    assert c.differences(a, b) == (2, [])
    b["results"]["s1"]["f1"] = 0.5000001
    assert c.differences(a, b) == (2, [(("results", "s1", "f1"), 0.5, 0.5000001)])
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert c.main(["x", str(pa), str(pb)]) == 1 and c.main(["x", str(pa), str(pa)]) == 0
