"""Orbax checkpoints that lose nothing: train state, data-iterator position and config.

Saves are asynchronous and atomic: orbax writes each step into a temporary directory and
renames it only once complete, so a run killed mid-save leaves the previous checkpoint as
the latest. Restoring takes the target shardings from an abstract state, so a checkpoint
written on one mesh restores onto any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp


def has_checkpoint(workdir: str | Path) -> bool:
    """Whether ``workdir`` holds a finished checkpoint (orbax names them by step; a save in
    progress is a ``*.orbax-checkpoint-tmp`` directory)."""
    d = Path(workdir) / "checkpoints"
    return d.is_dir() and any(p.is_dir() and p.name.isdigit() for p in d.iterdir())


class Checkpointer:
    """Keep-N manager over ``WORKDIR/checkpoints``; every save holds state + data + config."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        """``read_only`` opens another process's checkpoints (an evaluator watching a run):
        it never saves, deletes or creates anything there."""
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def reload(self) -> list[int]:
        """The finished steps, read again from disk (another process may have saved since), in
        order. orbax lists only finalized step directories: a save in progress (its temporary
        directory) is never among them."""
        self.manager.reload()
        return self.all_steps()

    def save(self, step: int, state: Any, data_iterator: Any | None, config_json: dict[str, Any]) -> None:
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config_json)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int | None, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Restore ``state`` (and the iterator's position, in place) from ``step`` or the latest."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            have = ", ".join(map(str, self.all_steps())) or "none"
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have: {have}): pass --step with one of those, or leave it out for the latest")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str | Path, step: int | None, abstract_params: Any) -> Any:
    """Only the parameters of a run's checkpoint (latest, or ``step``), laid out like
    ``abstract_params`` (shapes and shardings): the start of a run from another (``init.from``),
    which keeps neither the optimizer state nor the data position."""
    ckpt = Checkpointer(workdir)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            have = ", ".join(map(str, ckpt.all_steps())) or "none"
            raise FileNotFoundError(f"init.from: no checkpoint for step {step} in {ckpt.directory} (have: {have}): "
                                    f"pass WORKDIR@STEP with one of those")
        restore_args = ocp.checkpoint_utils.construct_restore_args({"params": abstract_params})
        item = ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args=restore_args,
                                      partial_restore=True)
        return ckpt.manager.restore(step, args=ocp.args.Composite(state=item))["state"]["params"]
    finally:
        ckpt.close()
