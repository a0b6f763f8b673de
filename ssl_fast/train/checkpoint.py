"""Atomic checkpoints: written to a temporary file in the same folder, then renamed over the old one."""
import os
import tempfile
from typing import Any, Dict, Optional

import torch

CHECKPOINT_NAME = "checkpoint.pth"


def save_atomic(obj: Dict[str, Any], path: str) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` is always either the old or the new file.

    The data goes to a temporary file in the same folder (same file system), is flushed and
    fsynced, and then replaces ``path`` with ``os.replace`` (atomic on POSIX and Windows).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def resolve_resume(resume: Optional[str], out: str) -> Optional[str]:
    """The checkpoint path ``--resume`` means: a file, a folder holding one, or ``auto`` (``out``'s, if any).

    Raises:
        FileNotFoundError: an explicit path that holds no checkpoint.
    """
    if resume is None:
        return None
    if resume == "auto":
        p = os.path.join(out, CHECKPOINT_NAME)
        return p if os.path.isfile(p) else None
    if os.path.isdir(resume):
        p = os.path.join(resume, CHECKPOINT_NAME)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--resume folder {resume!r} holds no {CHECKPOINT_NAME}")
        return p
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume checkpoint {resume!r} does not exist")
    return resume
