"""Atomic, verified checkpoints that keep the previous good one.

A save writes a temporary file in the checkpoint's folder (same file system), fsyncs it, loads
it back to verify it, keeps the current checkpoint as :data:`PREVIOUS_NAME`, and only then
renames the temporary file over :data:`CHECKPOINT_NAME`. A save killed at any point leaves the
old checkpoint intact; its temporary file is removed when the next save starts. Checkpoints get
the mode every other output gets (``0666`` less the umask), not ``mkstemp``'s ``0600``.
"""
import glob
import math
import os
import secrets
import shutil
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

CHECKPOINT_NAME = "checkpoint.pth"
PREVIOUS_NAME = "checkpoint.prev.pth"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit this run (the message names the file)."""


def _tmp_prefix(path: str) -> str:
    return ".tmp-" + os.path.basename(path) + "-"


def remove_stale_temporaries(path: str) -> List[str]:
    """Delete temporary files left by earlier, killed saves of ``path``; returns what was removed."""
    folder = os.path.dirname(os.path.abspath(path))
    removed = []
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(_tmp_prefix(path)) + "*")):
        try:
            os.remove(stale)
            removed.append(stale)
        except FileNotFoundError:
            pass
    return removed


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def iter_tensors(obj: Any, name: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor in a nest of dicts, lists and tuples, with a dotted name."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{name}.{i}" if name else str(i))


def non_finite_tensors(obj: Any) -> List[str]:
    """Names of the floating-point (or complex) tensors in ``obj`` that hold NaN or inf.

    One reduction per tensor and a single host synchronisation for the whole nest.
    """
    named = [(n, t) for n, t in iter_tensors(obj) if t.is_floating_point() or t.is_complex()]
    if not named:
        return []
    by_device: Dict[torch.device, List[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for idx in by_device.values():
        ts = [named[i][1].detach() for i in idx]
        ts = [t.abs() if t.is_complex() else t for t in ts]
        flags = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(
            [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in ts], math.inf)])
        bad += [idx[j] for j in torch.nonzero(~flags).flatten().tolist()]
    return [named[i][0] for i in sorted(bad)]


def save_atomic(obj: Dict[str, Any], path: str, verify: Optional[Callable[[Dict[str, Any]], None]] = None,
                keep_previous: Optional[str] = None) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` is always a complete, verified file.

    The data goes to a temporary file in the same folder, is flushed and fsynced, read back and
    checked, and then replaces ``path`` with ``os.replace`` (atomic on POSIX and Windows).
    Temporary files of earlier, killed saves of ``path`` are removed first.

    Args:
        obj: what to save.
        path: the checkpoint file.
        verify: called with the object loaded back from the temporary file; raises to refuse it
            (the temporary file is then removed and ``path`` is left as it was). Without it the
            file is still loaded back once to prove it is readable.
        keep_previous: a file name that keeps the checkpoint ``path`` held before this save (it
            is replaced only after the new file has been verified).

    Raises:
        CheckpointError: the written file does not load back.
        OSError: the file could not be written (``path`` is unchanged).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    while True:
        tmp = os.path.join(folder, _tmp_prefix(path) + secrets.token_hex(6))
        try:
            # 0o666 less the umask, the mode open() gives the other outputs
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            back = torch.load(tmp, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any failure to read back refuses the file
            raise CheckpointError(f"the checkpoint just written for {path} does not load back "
                                  f"({type(e).__name__}: {e}); {path} was left as it was") from e
        if verify is not None:
            verify(back)
        del back
        if keep_previous is not None and os.path.isfile(path):
            prev_tmp = tmp + ".prev"
            try:
                os.link(path, prev_tmp)
            except OSError:
                shutil.copy2(path, prev_tmp)
            os.replace(prev_tmp, keep_previous)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        for p in (tmp, tmp + ".prev"):
            if os.path.exists(p):
                os.remove(p)
        raise


def load_checkpoint(path: str, map_location: Any = "cpu",
                    required: Tuple[str, ...] = ("epoch", "config", "method", "optimizer", "rng")) -> Dict[str, Any]:
    """Load a checkpoint written by the trainer, with one clear error when it cannot be used.

    Args:
        path: the checkpoint file.
        map_location: ``torch.load``'s ``map_location``.
        required: keys the checkpoint must hold.

    Raises:
        CheckpointError: the file is truncated, corrupt, not a checkpoint, or lacks ``required``
            keys; the message names the file and, where one exists, the previous checkpoint.
    """
    prev = os.path.join(os.path.dirname(os.path.abspath(path)), PREVIOUS_NAME)
    hint = (f"; the previous checkpoint {prev} may still be intact (--resume {prev})"
            if os.path.isfile(prev) and os.path.abspath(prev) != os.path.abspath(path) else "")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for bad files
        size = os.path.getsize(path) if os.path.exists(path) else 0
        reason = str(e).splitlines()[0].split(". ")[0] if str(e) else ""  # torch's first sentence
        raise CheckpointError(f"cannot resume from {path}: the file ({size} bytes) is not a readable "
                              f"checkpoint, it is truncated or corrupt ({type(e).__name__}: {reason}){hint}") from None
    if not isinstance(ck, dict) or any(k not in ck for k in required):
        missing = [k for k in required if not isinstance(ck, dict) or k not in ck]
        raise CheckpointError(f"cannot resume from {path}: it is not an ssl_fast training checkpoint "
                              f"(missing {', '.join(missing)}){hint}")
    return ck


def resolve_resume(resume: Optional[str], out: str) -> Optional[str]:
    """The checkpoint path ``--resume`` means: a file, a folder holding one, or ``auto`` (``out``'s, if any).

    ``auto`` and a folder take :data:`CHECKPOINT_NAME`, else :data:`PREVIOUS_NAME` (left alone
    only if a save was killed between keeping the previous file and renaming the new one).

    Raises:
        FileNotFoundError: an explicit path that holds no checkpoint.
    """
    if resume is None:
        return None

    def in_folder(folder: str) -> Optional[str]:
        for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                return p
        return None

    if resume == "auto":
        return in_folder(out)
    if os.path.isdir(resume):
        p = in_folder(resume)
        if p is None:
            raise FileNotFoundError(f"--resume folder {resume!r} holds no {CHECKPOINT_NAME}")
        return p
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume checkpoint {resume!r} does not exist")
    return resume
