"""Write an output folder atomically: into a hidden temporary sibling, renamed into place only when complete."""

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir`; on success rename it to `output_dir`, on failure delete it.

    An existing `output_dir` raises `OutputExistsError` (a `FileExistsError`) before anything is written, unless `overwrite=True`, in which
    case it is replaced only after the new folder is complete.

    Example:
    ```python
    >>> with atomic_output_dir("out/model") as folder:
    ...     model.save_pretrained(folder)
    ```
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            output_dir.rename(retired / output_dir.name)
            staging.rename(output_dir)
            shutil.rmtree(retired)
        else:
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
