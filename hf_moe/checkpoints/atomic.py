"""The output folder of every writer: resolved and checked once (`resolve_output_dir`), then written atomically into a
hidden temporary sibling that is renamed into place only when complete."""

import contextlib
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputExistsError


def _sibling_dir(target: Path, tag: str) -> Path:
    """A new hidden folder beside `target`, created by a plain `mkdir` so it gets the user's umask (not the 0o700 of
    `tempfile.mkdtemp`, which would make the renamed output unreadable to a server or a colleague)."""
    while True:
        candidate = target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _give_files_the_umask_mode(folder: Path) -> None:
    """Files written through temporary files (safetensors, `tempfile.mkstemp`) are created 0o600; give every file the
    mode a plain `open(..., "w")` would (the folder's umask-derived mode without the execute bits)."""
    file_mode = folder.stat().st_mode & 0o666
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(file_mode)


@contextlib.contextmanager
def _termination_raises() -> Iterator[None]:
    """Turn SIGTERM into `SystemExit(143)` for the duration, so `finally`/`except` cleanup runs as it does for
    SIGINT's `KeyboardInterrupt` (the default SIGTERM action kills the process without unwinding).

    Only where Python may install handlers (the main thread) and only over the default action: a handler the
    application installed itself is left alone.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def resolve_output_dir(output_dir: str | Path | None, *, overwrite: bool = False,
                       default: str | Path | None = None) -> Path:
    """The output folder: `output_dir`, else `default`. An existing folder raises `OutputExistsError` (a
    `FileExistsError`) unless `overwrite=True`.

    Every command calls it as soon as it knows the folder (before its source's tensors are read, so a refusal costs
    nothing), and `atomic_output_dir` again just before writing (the folder may have appeared meanwhile).

    Example:
    ```python
    >>> resolve_output_dir(None, default=Path("out") / "smol-hf_moe-8x2")  # PosixPath('out/smol-hf_moe-8x2')
    ```
    """
    if output_dir is None and default is None:
        raise ValueError("an output folder is needed: pass `output_dir`")
    output_dir = Path(output_dir if output_dir is not None else default)
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(output_dir)
    return output_dir


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir`; on success rename it to `output_dir`, on failure delete it.

    An existing `output_dir` raises `OutputExistsError` (`resolve_output_dir`) before anything is written, unless
    `overwrite=True`, in which case it is replaced only after the new folder is complete. The folder gets the
    permissions of a plain `mkdir` (umask), its files those of a plain `open` (never the 0o600 of temporary files),
    and an interruption (an exception, Ctrl-C, SIGTERM) leaves no staging
    folder behind.

    Example:
    ```python
    >>> with atomic_output_dir("out/model") as folder:
    ...     model.save_pretrained(folder)
    ```
    """
    output_dir = resolve_output_dir(output_dir, overwrite=overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with _termination_raises():
        staging = _sibling_dir(output_dir, "partial")
        try:
            yield staging
            _give_files_the_umask_mode(staging)
            if output_dir.exists():
                retired = _sibling_dir(output_dir, "old")
                output_dir.rename(retired / output_dir.name)
                staging.rename(output_dir)
                shutil.rmtree(retired)
            else:
                staging.rename(output_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
