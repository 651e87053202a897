"""Ahead-of-time compile of the Stage 1 and Stage 2 train steps for a TPU topology, from a CPU machine.

Needs libtpu, kept out of the default requirements: python3 -m venv .venv-tpu &&
.venv-tpu/bin/python -m pip install -r requirements-tpu.txt. Prints per-device memory and writes
WORKDIR/compile_<topology>.json/md. The model, train, stage2 and mesh keys are those of the run being planned: pass
the same overrides you will pass to configs/stage1.py and configs/stage2.py. docs/scale.md has the llama3_8b command:

    .venv-tpu/bin/python -m pal_jax.main --config=configs/compile.py:llama3_8b --workdir=/tmp/pal_aot \
        --config.compile.topology=v5p-64 --config.compile.seq_len=2048 \
        --config.model.dtype=bfloat16 --config.model.remat=True \
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.train.batch_size=64 --config.stage2.batch_size=32
"""

from configs import common


def get_config(preset="tiny"):
    return common.base_config("compile", preset or "tiny")
