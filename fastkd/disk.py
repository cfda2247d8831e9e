"""Writing files when the disk may be full: a write that fails leaves no half-written ``.tmp`` behind, and a full
disk becomes one clear error saying where and what was kept (torch.save's own was 'RuntimeError ... unexpected
pos', with the partial file left in place)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


class DiskFullError(OSError):
    """No space left while writing a run's or the cache's files; the message says what was kept."""


def disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("unexpected pos" in text or "No space left" in text)


@contextlib.contextmanager
def writing(tmp: Path, what: str, kept: str = "") -> Iterator[None]:
    """Around writing ``tmp`` (renamed into place afterwards by the caller): on any failure remove it; on a full
    disk raise :class:`DiskFullError` naming the folder, ``what`` was being written and what was ``kept``."""
    try:
        yield
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise DiskFullError(errno.ENOSPC, f"no space left on the disk of {tmp.parent} while writing {what}; the "
                                f"partial {tmp.name} was removed" + (f"; {kept}" if kept else "")) from e
        raise


def save_model_dir(folder: Path, *savers, kept: str = "") -> None:
    """``save_pretrained`` (of each of ``savers``: a model, its tokenizer) into ``folder`` atomically: written
    beside it, then swapped in, so a reader never sees half a model and a full disk leaves the old folder (or
    none) and no partial one."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for saver in savers:
            saver.save_pretrained(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise DiskFullError(errno.ENOSPC, f"no space left on the disk of {folder.parent} while writing "
                                f"{folder.name}/; the partial copy was removed" + (f"; {kept}" if kept else "")) from e
        raise
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
