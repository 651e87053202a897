"""pal_jax: PAL (Persona-Aware Alignment) dialogue models in JAX/Flax NNX."""
from flax import nnx as _nnx

# Params are created unsharded and placed by jitted initialisers with explicit out_shardings (see train.py);
# flax's eager sharding would instead require a mesh context at every construction.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
