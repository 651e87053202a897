"""Stage 2's precomputed reference log-probs (stage2.precompute_ref), cached on disk and reused by later runs.

Where: `<folder of the pairs file>/ref_logps/<fingerprint>.npz`, beside the pairs they score, so that a rerun, or a
second Stage 2 in another workdir on the same pairs.jsonl and reference (an ablation of beta or of the loss type),
reuses them; when that folder cannot be written (a read-only share of the pairs), `WORKDIR/ref_logps/` instead.
Both places are looked in.

The fingerprint is the SHA-256 of a JSON record of everything the numbers depend on (`cache_key`):
- the pairs file's content (the SHA-256 of its bytes; not its path or time stamp);
- the reference params' values: a 128-bit hash of the bits of every array, computed on device (`params_hash`: one
  pass over the params, no host copy, the same on any mesh), with each leaf's path, shape and dtype; it identifies
  every kind of reference alike (the Stage 1 model, the weights it started from, a LoRA base + adapters);
- the rows scored: a SHA-256 of each split's token ids (prompt, chosen, rejected of every pair), which covers
  whatever turned the pairs into rows (the tokenizer, data.max_len's cuts and drops, stage2.dev_fraction's held-out
  dialogues, data.labeler for unlabelled pairs, the chat template of conversational pairs);
- and, named for a reader of the record: data.max_len, data.buckets, the tokenizer (its serialized form and special
  ids), stage2.dev_fraction, config.model (the compute dtype among others; not model.attention, whose
  implementations agree to float rounding, as two meshes do) and config.lora.
The file holds one [N, 2] float32 array (chosen, rejected) per split and the record with the arrays' SHA-256. A file
that does not read, whose record differs from this run's, whose arrays have other sizes, another checksum or
non-finite values is never trusted: a warning names the problem and the log-probs are computed again and the file
rewritten. Files are written whole to a temporary name and renamed (never seen half-written).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from pal_jax.core import atomic
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.model.transformer import RUN_TIME_FIELDS

FORMAT = 1
FOLDER = "ref_logps"


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (uint32 arithmetic wraps)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


_SEEDS = (0x9E3779B1, 0x7F4A7C15, 0x94D049BB, 0xBF58476D)


def _leaf_hash(x):
    """[4] uint32: sums over the elements of fmix(bits ^ fmix(index * seed)): integer sums (mod 2^32) are exact in
    any order, so the hash is the same on any mesh and sharding; elementwise, so it keeps the leaf's sharding."""
    size = np.dtype(x.dtype).itemsize
    if size == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]).astype(jnp.uint32)
    idx = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(bits.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[d]
    return jnp.stack([jnp.sum(_fmix32(bits ^ _fmix32(idx * jnp.uint32(s) + jnp.uint32(1))), dtype=jnp.uint32)
                      for s in _SEEDS])


def params_hash(tree) -> str:
    """A hex digest of a params tree's values (and each leaf's path, shape and dtype), computed on device."""
    hashes = jax.jit(lambda t: jax.tree.map(_leaf_hash, t))(tree)
    h = hashlib.sha256()
    for (path, leaf), lh in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(hashes)):
        value = np.asarray(mesh_lib.to_host(lh), np.uint32)
        h.update(json.dumps([jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]).encode())
        h.update(value.tobytes())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.tok.to_str().encode("utf-8"))
    h.update(json.dumps([tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id]).encode())
    return h.hexdigest()


def _jsonable(v):
    if hasattr(v, "to_dict"):
        v = v.to_dict()
    return json.loads(json.dumps(v, default=list))


def rows_sha256(pairs) -> str:
    """SHA-256 of encoded pairs (stage2.PairEncoded): every pair's prompt, chosen and rejected token ids."""
    h = hashlib.sha256()
    for part in zip(pairs.prompt, pairs.chosen, pairs.rejected):
        for ids in part:
            h.update(np.asarray([len(ids), *ids], np.int64).tobytes())
    return h.hexdigest()


def cache_key(config, pairs_file: str, ref_params, tokenizer, encoded: dict) -> dict:
    """The record the cache file is named by (module doc); encoded: {split: stage2.PairEncoded}."""
    return {"format": FORMAT, "pairs_sha256": ckpt_lib.file_digest(epath.Path(os.fspath(pairs_file)))[1], "reference": params_hash(ref_params),
            "rows": {name: rows_sha256(enc) for name, enc in sorted(encoded.items())},
            "max_len": int(config.data.max_len), "buckets": [int(b) for b in config.data.buckets],
            "tokenizer": tokenizer_hash(tokenizer), "dev_fraction": float(config.stage2.dev_fraction),
            "model": {k: v for k, v in _jsonable(config.model).items() if k not in RUN_TIME_FIELDS},
            "lora": _jsonable(config.get("lora") or {})}


def fingerprint(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def folders(pairs_file: str, workdir: str) -> list[epath.Path]:
    """Where cache files are looked for and written, in order: beside the pairs file, then in the workdir."""
    out = [epath.Path(os.fspath(pairs_file)).parent / FOLDER, epath.Path(os.fspath(workdir)) / FOLDER]
    return out[:1] if os.fspath(out[0]) == os.fspath(out[1]) else out


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name], np.float32).tobytes())
    return h.hexdigest()


def _differences(saved, key: dict) -> str:
    if not isinstance(saved, dict):
        return "its record is not a JSON object"
    names = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
    return f"its record differs from this run's in {names}"


def load(path: epath.Path, key: dict, sizes: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The cached arrays at path when the file exists and passes every check (module doc); None otherwise, with a
    warning when a file was there but is not trusted."""
    if not path.exists():
        return None
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
            record = json.loads(str(z["record"]))
            arrays = {name: np.asarray(z[name]) for name in sizes}
    except Exception as e:  # noqa: BLE001 (a cut or damaged zip, a missing member, bad JSON: never trusted)
        problem = f"it cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    else:
        problem = None
        if not isinstance(record, dict) or record.get("key") != key:
            problem = _differences(record.get("key") if isinstance(record, dict) else record, key)
        elif any(a.shape != (n, 2) or a.dtype != np.float32 for (name, n), a in
                 zip(sizes.items(), arrays.values())):
            problem = (f"its arrays have shapes {[(a.shape, str(a.dtype)) for a in arrays.values()]}, expected "
                       f"{[((n, 2), 'float32') for n in sizes.values()]}")
        elif record.get("arrays_sha256") != _arrays_sha256(arrays):
            problem = "its arrays do not match their SHA-256 (damaged)"
        elif not all(np.isfinite(a).all() for a in arrays.values()):
            problem = "it holds non-finite log-probs"
    if problem:
        logging.warning("reference log-probs: the cache file %s is not used: %s; computing them again", path,
                        problem)
        return None
    return arrays


def save(folder_list: list[epath.Path], name: str, key: dict, arrays: dict[str, np.ndarray]) -> str | None:
    """Write the cache file into the first folder that takes it (temporary name, then renamed); its path, or None
    (with a warning) when none does: the run goes on without a cache."""
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
    record = {"key": key, "arrays_sha256": _arrays_sha256(arrays)}
    buf = io.BytesIO()
    np.savez(buf, record=np.asarray(json.dumps(record, sort_keys=True)), **arrays)
    data = buf.getvalue()
    errors = []
    for folder in folder_list:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return atomic.write_bytes(folder / name, data)  # a failed write leaves no temporary file
        except OSError as e:
            errors.append(f"{folder}: {type(e).__name__}: {e}")
    logging.warning("reference log-probs: not cached (no folder could be written: %s)", "; ".join(errors))
    return None
