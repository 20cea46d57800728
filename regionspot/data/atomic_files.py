"""File writing shared by the dataset generator, the feature cache and the proposal files."""
import os
import tempfile

__all__ = ["atomic_write_bytes"]

# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """
    Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``, so a
    reader (or an interrupted run) never sees a partial file. The folder must exist; the file gets
    the usual permissions (``0o666`` less the umask; ``mkstemp`` alone would make it 0600).
    """
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
