"""The optional C++ kernels (``_native/*.cpp``): build, find, load.

The Monarch multiply's two stride permutations are plain copies that PyTorch's
generic strided copy runs slowly when the inner group is a few elements; the
kernels in ``_native/permute.cpp`` do them (and the bias add) with vector
shuffles, 2-4x faster (docs/speed.md); ``_native/small_blocks.cpp`` multiplies
by Monarch matrices with small blocks in one pass.  They are optional: ``make`` builds
them once (``monarch-matrices native build``), and without them, or
with ``MONARCH_MATRICES_NATIVE=0`` in the environment, every op runs the
pure-PyTorch path, which gives the same results bit for bit for the
permutations and up to rounding where a kernel sums in another order (the
bias gradient, the small-block multiply).

The build goes to ``_native/build/`` next to this file (or
``$MONARCH_MATRICES_NATIVE_DIR``) under a name that hashes the source, the
compiler flags, torch's version and the CPU model and features, so a stale
or foreign build is never loaded; loading never compiles.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "available", "build", "kernels", "plain_cpu_tensor", "status", "switched_off", "switched_on",
]

SOURCE_DIR = Path(__file__).with_name("_native")
# module.cpp: the bindings
SOURCE_NAMES = (
    "permute.cpp", "small_blocks.cpp", "small_blocks_dpbf16.cpp", "few_tokens.cpp",
    "weight_grad_dpbf16.cpp", "module.cpp",
)
HEADER_NAMES = ("bf16_pairs.h", "cache_lines.h", "group_transpose.h", "partials.h", "vec.h")


def sources() -> list[Path]:
    return [SOURCE_DIR / name for name in SOURCE_NAMES]


def _all_files() -> list[Path]:
    """Everything the build reads: the sources and their headers."""
    return sources() + [SOURCE_DIR / name for name in HEADER_NAMES]


def _missing_source() -> Path | None:
    return next((path for path in _all_files() if not path.is_file()), None)
# Tuned for the machine it is built on (the kernels exist to be fast here);
# the hash below includes the CPU model, so a build is only used where it was made.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp")
PORTABLE_FLAGS = ("-O3", "-fopenmp")
ENV_SWITCH = "MONARCH_MATRICES_NATIVE"
ENV_DIR = "MONARCH_MATRICES_NATIVE_DIR"


def switched_off(variable: str) -> bool:
    """Whether the environment turns an optional fast path off (0, false, no, off)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def switched_on(variable: str) -> bool:
    """Whether the environment turns an opt-in path on (1, true, yes, on)."""
    return os.environ.get(variable, "0").strip().lower() in ("1", "true", "yes", "on")


def plain_cpu_tensor(t: torch.Tensor) -> bool:
    """A real CPU tensor with memory behind ``data_ptr()``, outside any tracing.

    Only such tensors may go to the kernels or to ``madvise``: subclasses
    (FakeTensor under ``FakeTensorMode``, DTensor, ...), traced graphs
    (``torch.compile``) and lazily negated or conjugated views (whose memory
    holds the other sign) take the PyTorch ops, which know how to handle them.
    """
    return (not torch.compiler.is_compiling()  # first: Dynamo breaks the graph on is_neg()
            and type(t) in _PLAIN and t.is_cpu and not t.is_neg() and not t.is_conj())


# the exact types (not subclasses) whose memory is what it says: a parameter is one
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def build_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or SOURCE_DIR / "build")


def _cpu_model() -> str:
    """The CPU's model and feature flags: a VM may mask features of the same model."""
    found = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "Model", "flags", "Features") and key not in found:
                found[key] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return " | ".join(found.values()) or platform.processor() or platform.machine()


def module_name(flags: tuple[str, ...] = FLAGS) -> str:
    """The extension's name: it changes whenever anything that shapes the binary does."""
    key = hashlib.sha256()
    parts = [path.read_bytes() for path in _all_files()]
    for part in (*parts, " ".join(flags).encode(), torch.__version__.encode(),
                 _cpu_model().encode(), sys.version.encode()):
        key.update(part)
        key.update(b"\0")
    return f"monarch_native_{key.hexdigest()[:12]}"


def _library(name: str) -> Path:
    return build_dir() / f"{name}.so"


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _load() -> tuple[ModuleType | None, str]:
    if switched_off(ENV_SWITCH):
        return None, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    if (missing := _missing_source()) is not None:
        return None, f"the kernel source {missing} is not installed"
    failures = []
    for flags in (FLAGS, PORTABLE_FLAGS):
        name = module_name(flags)
        path = _library(name)
        if path.is_file():
            try:
                return _import(name, path), f"loaded {path}"
            except (ImportError, OSError) as err:  # e.g. built against another torch ABI
                failures.append(f"{path} failed to load: {err}")
    if failures:
        return None, "; ".join(failures)
    return None, (f"not built (no {_library(module_name())}); run `monarch-matrices native build` "
                  "(or `make native`) to build it")


def kernels() -> ModuleType | None:
    """The loaded extension module, or ``None`` (then callers use PyTorch ops)."""
    return _load()[0]


def available() -> bool:
    return kernels() is not None


def bf16_dot() -> bool:
    """Whether the kernels are loaded and were built with the CPU's bf16 dot products
    (AVX512-BF16), which the bf16 few-token, small-block and weight-gradient kernels use."""
    module = kernels()
    return module is not None and module.bf16_dot()


def status() -> str:
    """One line saying whether the kernels are in use, and if not why; when they
    are, whether they were built with the CPU's bf16 dot products (:func:`bf16_dot`)."""
    module, message = _load()
    if module is None:
        return message
    return f"{message}; bf16 dot products (AVX512-BF16): {'yes' if module.bf16_dot() else 'no'}"


def build(verbose: bool = False) -> Path:
    """Compile the kernels into :func:`build_dir` (about 30 s) and return the library path.

    Tries the machine-tuned flags first, then portable ones.  Needs a C++
    compiler and ninja; raises ``RuntimeError`` naming what failed.
    """
    from torch.utils.cpp_extension import load  # imported here: it is slow and rarely needed

    if (missing := _missing_source()) is not None:
        raise RuntimeError(f"the kernel source {missing} is not installed")
    build_dir().mkdir(parents=True, exist_ok=True)
    errors = []
    path_before = os.environ.get("PATH", "")
    # ninja from the `native` extra lives next to this Python, maybe not on PATH
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + path_before
    try:
        for flags in (FLAGS, PORTABLE_FLAGS):
            name = module_name(flags)
            work = build_dir() / name
            work.mkdir(exist_ok=True)
            try:
                load(name=name, sources=[str(path) for path in sources()], extra_cflags=list(flags),
                     extra_ldflags=["-fopenmp"], build_directory=str(work), verbose=verbose)
            except Exception as err:  # compiler missing, flag unsupported, ...
                errors.append(f"{' '.join(flags)}: {err}")
                continue
            fd, tmp = tempfile.mkstemp(dir=build_dir(), suffix=".so.tmp")
            with os.fdopen(fd, "wb") as out:
                out.write((work / f"{name}.so").read_bytes())
            os.replace(tmp, _library(name))  # atomic: a loader sees all of it or nothing
            _load.cache_clear()
            return _library(name)
    finally:
        os.environ["PATH"] = path_before
    raise RuntimeError("could not build the native kernels:\n" + "\n".join(errors))
