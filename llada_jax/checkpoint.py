"""Orbax checkpoints of a run: params, optimizer state and metadata, saved asynchronously.

DIR/checkpoints/<step>/ holds three items: `params`, `opt_state` (absent in a params-only
checkpoint, e.g. one converted from Hugging Face) and `meta` (JSON: step and the resolved config).
Orbax writes each step to a temporary directory and renames it when complete, so a crash or a
kill -9 mid-save leaves the previous checkpoint as the latest readable one. The RNG and the data
position need no saving: both are pure functions of (seed, step).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any
ITEMS = ("params", "opt_state", "meta")

# Model keys that change parameter shapes or tree structure: a resumed run may not change them.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
              "mlp_hidden", "tie_embeddings", "scan_layers", "param_dtype")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Saves every `save_every` steps, keeps the last `max_to_keep` plus every `keep_every`-th."""

    def __init__(self, workdir: str, save_every: int = 0, max_to_keep: int | None = 3,
                 keep_every: int | None = None, async_save: bool = True):
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, keep_period=keep_every or None,
                enable_async_checkpointing=async_save, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, params: PyTree, opt_state: PyTree | None, meta: dict,
             chunk_bytes: int | None = None) -> None:
        """Starts an asynchronous save (returns after the device-to-host copy).

        chunk_bytes: the largest storage chunk of a parameter (None: Orbax's choice).
        """
        save_args = None if chunk_bytes is None else jax.tree.map(
            lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), params)
        items = dict(params=ocp.args.StandardSave(params, save_args=save_args),
                     meta=ocp.args.JsonSave(meta))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, params: PyTree, opt_state: PyTree | None = None
                ) -> tuple[PyTree, PyTree | None]:
        """Restores onto the shapes and shardings of the given (abstract or real) trees."""
        items = dict(params=ocp.args.StandardRestore(abstract(params)))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract(opt_state))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out.get("opt_state") if opt_state is not None else None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying each leaf's sharding (the restore target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def shape_changes(saved_model: dict, model: dict) -> list[str]:
    """Model keys whose change would alter parameter shapes: 'key: saved -> new'."""
    return [f"model.{k}: {saved_model.get(k)!r} -> {model.get(k)!r}" for k in SHAPE_KEYS
            if saved_model.get(k) != model.get(k)]
