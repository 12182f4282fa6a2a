"""Resumable block-wise learning: a work folder that keeps each finished block.

PTQ1.61 learns one transformer block after the other; on a 7B model that is hours. After each
block, `BlockCheckpoint.save` writes to the work folder (docs/reliability.md):
- ``block-NNNN.pt``: the block's packed weights (a few MB per block of a 135M model);
- ``resume.pt``: what the next block needs: its fp and quantized inputs ([n, L, D] fp32 each),
  the learning's random generator state and the index of the next block, with the fingerprint
  of everything the learning depends on (weights, calibration ids, salient channels, settings).

Each file is written beside its final name and renamed into place, the block's weights before
the resume state that points past them, so a run killed at any instant leaves a folder that
resumes from the last complete block. `load` returns nothing for a folder whose fingerprint
differs (another model, other data or settings): the run starts over. Resuming gives the same
bytes as an uninterrupted run (tests/test_resume.py), since the next block starts from
bit-identical inputs and generator state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch

from .errors import QexportError

FORMAT = 1
STATE = "resume.pt"
E2E_STATE = "e2e.pt"  # end-to-end tuning's progress (E2ECheckpoint), after the blocks


def fingerprint(module: torch.nn.Module, calib_ids: torch.Tensor,
                salient: dict[str, torch.Tensor], settings: dict) -> str:
    """sha256 over every tensor of the module's state, the calibration ids, the salient
    channels, the learning's settings (a dict of plain values), the thread count (float sums
    depend on it) and the qexport and torch versions."""
    from . import __version__

    h = hashlib.sha256()
    h.update(f"qexport {__version__} torch {torch.__version__} threads "
             f"{torch.get_num_threads()};".encode())

    def tensor(name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    for name, t in module.state_dict().items():
        tensor(name, t)
    tensor("calib_ids", calib_ids)
    for name in sorted(salient):
        tensor(f"salient:{name}", salient[name])
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


@dataclasses.dataclass
class Resumed:
    """A checkpoint's content: blocks [0, next_block) done."""
    next_block: int
    packed: dict  # layer name -> packed weights, for every layer of the finished blocks
    x_fp: torch.Tensor
    x_q: torch.Tensor
    generator_state: torch.Tensor


class BlockCheckpoint:
    """The work folder of one learning run, identified by its fingerprint."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str, num_blocks: int):
        self.folder, self.fingerprint, self.num_blocks = Path(folder), fingerprint, num_blocks

    def _block(self, bi: int) -> Path:
        return self.folder / f"block-{bi:04d}.pt"

    @staticmethod
    def _write(obj, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)

    def save(self, bi: int, packed: dict, x_fp: torch.Tensor, x_q: torch.Tensor,
             generator: torch.Generator) -> None:
        """Block `bi` is done: its packed weights, and the inputs of block bi + 1."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write({name: dataclasses.asdict(w) for name, w in packed.items()},
                        self._block(bi))
            self._write({"format": FORMAT, "fingerprint": self.fingerprint,
                         "num_blocks": self.num_blocks, "next_block": bi + 1,
                         "threads": torch.get_num_threads(),
                         "x_fp": x_fp, "x_q": x_q,
                         "generator_state": generator.get_state()}, self.folder / STATE)
        except OSError as e:
            raise QexportError(f"cannot write the learning checkpoint in {self.folder}: "
                               f"{e.strerror or e}") from e

    def load(self, weights_cls, say=None) -> Resumed | None:
        """The checkpoint, or None when there is none. One left by another run (another
        fingerprint: other weights, data, settings, thread count or versions) is removed, and
        `say` told: this run starts over and keeps its own blocks there."""
        state = read_state(self.folder)
        if state is None:
            remove(self.folder)  # nothing usable (e.g. killed before its first block)
            return None
        if state.get("fingerprint") != self.fingerprint or \
                state.get("num_blocks") != self.num_blocks:
            remove(self.folder)
            if say:
                say(f"PTQ1.61: the checkpoint in {self.folder} is from other inputs or settings "
                    "(model, data, options, thread count or versions): starting over")
            return None
        packed = {}
        for bi in range(state["next_block"]):
            try:
                block = torch.load(self._block(bi), weights_only=True)
            except Exception as e:  # noqa: BLE001 - a damaged work folder: start over
                raise QexportError(f"the learning checkpoint in {self.folder} is damaged "
                                   f"({self._block(bi).name}: {type(e).__name__}); rerun with "
                                   "--no-resume to start over") from e
            packed.update({name: weights_cls(**fields) for name, fields in block.items()})
        return Resumed(state["next_block"], packed, state["x_fp"], state["x_q"],
                       state["generator_state"])


class E2ECheckpoint:
    """End-to-end tuning's progress in the same work folder (qexport.e2e): every few steps
    the trained factors, the optimizer's and schedule's states, the epoch's sample order and
    position, written beside its final name and renamed into place. A run resumed from it
    takes the same steps on the same values as an uninterrupted one (tests/test_resume.py)."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint

    def save(self, state: dict) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            BlockCheckpoint._write({"format": FORMAT, "fingerprint": self.fingerprint,
                                    **state}, self.folder / E2E_STATE)
        except OSError as e:
            raise QexportError(f"cannot write the end-to-end tuning checkpoint in "
                               f"{self.folder}: {e.strerror or e}") from e

    def load(self, say=None) -> dict | None:
        """The saved state, or None. One of other inputs or settings is removed (and `say`
        told): the tuning starts over."""
        path = self.folder / E2E_STATE
        if not path.is_file():
            return None
        try:
            state = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - damaged (killed mid-write is not: renamed whole)
            state = None
        if not isinstance(state, dict) or state.get("format") != FORMAT or \
                state.get("fingerprint") != self.fingerprint:
            path.unlink(missing_ok=True)
            if say:
                say(f"end-to-end tuning: the checkpoint in {self.folder} is from other inputs "
                    "or settings: starting over")
            return None
        return state


def read_state(folder: str | os.PathLike) -> dict | None:
    """The resume state of a work folder (None: no folder, no state, or unreadable)."""
    path = Path(folder) / STATE
    if not path.is_file():
        return None
    try:  # memory-mapped: reading the counts does not read the activations (GBs on 7B)
        state = torch.load(path, weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged state (by hand, or the disk) counts as none
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None


def saved_threads(folder: str | os.PathLike) -> int | None:
    """The thread count the checkpoint was learned with (a resumed run uses it unless told
    otherwise: float sums, and so the bytes, depend on it)."""
    state = read_state(folder)
    return None if state is None else state.get("threads")


def describe(folder: str | os.PathLike) -> str | None:
    """"3 of 30 blocks" when the folder holds a checkpoint ("30 of 30 blocks and 24 of 64
    end-to-end tuning steps" once that stage saved), else None."""
    state = read_state(folder)
    if state is None:
        return None
    text = f"{state['next_block']} of {state['num_blocks']} blocks"
    try:
        e2e = torch.load(Path(folder) / E2E_STATE, weights_only=True)
        text += f" and {e2e['step']} of {e2e['steps']} end-to-end tuning steps"
    except Exception:  # noqa: BLE001 - none (or unreadable): the blocks alone
        pass
    return text


def remove(folder: str | os.PathLike) -> None:
    """Remove a work folder's files (only those a checkpoint writes), then the folder if that
    leaves it empty: a folder given by mistake (".", a project folder) keeps everything else."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_file() and (p.name in (STATE, STATE + ".tmp", E2E_STATE, E2E_STATE + ".tmp") or
                            (p.name.startswith("block-") and p.name.endswith((".pt", ".pt.tmp")))):
            p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: not only ours
