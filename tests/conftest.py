"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONVAI2_DIR = REPO.parent / "shared" / "data" / "convai2"


@pytest.fixture
def convai2_dir():
    """The real ConvAI2 validation files from ../shared, or a skip saying why."""
    if not (CONVAI2_DIR / "valid_self_original_no_cands.txt").exists():
        pytest.skip(f"ConvAI2 data not found at {CONVAI2_DIR} (only present beside the project's CI checkout)")
    return CONVAI2_DIR


@pytest.fixture(scope="session")
def hf():
    """(torch, transformers) for the Hugging Face parity tests; skipped, with the reason, without the CPU torch."""
    torch = pytest.importorskip("torch", reason="torch (test-only, CPU wheel) is needed for the HF parity tests")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers
