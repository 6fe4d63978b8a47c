"""bitsandbytes without its Hub kernel: hf_moe never downloads at run time, and nothing prints on import.

On CPUs with AVX512-BF16, bitsandbytes (0.50) asks the `kernels` package at import for an optional CPU kernel from
the Hub (`kernels-community/quantization-bitsandbytes`): a download at run time, or, offline or where the publisher
cannot be verified, a warning from `kernels` and another from bitsandbytes. transformers >= 5.25 installs
`kernels`, and bitsandbytes is imported by peft, which transformers' Trainer imports whenever peft is installed, so
the first `from transformers import Trainer` of a process would print (or fetch) although nothing is quantised.

`install()` (run by `import hf_moe`) makes the first import of bitsandbytes in the process, by whoever, run with
`kernels` hidden and that one import-time notice at ERROR: bitsandbytes then uses its own CPU kernel, exactly as
where `kernels` is not installed. Nothing is imported until someone imports bitsandbytes. This leans on two
bitsandbytes internals, pinned by tests/test_startup.py and listed in docs/private_apis.md: the kernel is asked
for with `from kernels import get_kernel` while `bitsandbytes` executes, and the notice is logged by the logger
`bitsandbytes.backends.cpu.ops`.
"""

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys

_NOTICE_LOGGER = "bitsandbytes.backends.cpu.ops"
_MISSING = object()


@contextlib.contextmanager
def _without_hub_kernels():
    """`import kernels` fails (ImportError, which bitsandbytes expects) and bitsandbytes' notice about it is not
    shown; both restored on exit."""
    hidden = sys.modules.get("kernels", _MISSING)
    sys.modules["kernels"] = None  # an import of a module mapped to None raises ImportError
    notices = logging.getLogger(_NOTICE_LOGGER)
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notices.setLevel(level)
        if hidden is _MISSING:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = hidden



class _QuietLoader(importlib.abc.Loader):
    """The real loader of the `bitsandbytes` package, executing it with the Hub kernels hidden."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The module keeps its real loader (importlib.resources and friends read it).
        module.__loader__ = module.__spec__.loader = self.loader
        with _without_hub_kernels():
            self.loader.exec_module(module)


class _BitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds `bitsandbytes` as the path finder does, with `_QuietLoader` around its loader (once per process)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "bitsandbytes":
            return None
        uninstall()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Have the process's first import of bitsandbytes run without Hub kernels (no-op once it is imported)."""
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _BitsandbytesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesFinder())


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _BitsandbytesFinder)]
