"""The C relay (gateway/_crelay.c) built with AddressSanitizer and UndefinedBehaviorSanitizer, and
a pytest run of the relay tests against that build (tests/gateway/test_relay_sanitized.py).

:func:`build` compiles the source with ``-fsanitize=address,undefined -fno-sanitize-recover=all``
into ``build/sanitized-relay/<key>/`` (``/build/`` is ignored by git); the key hashes the source,
the flags, the compiler and the interpreter, so an edited ``_crelay.c`` is always rebuilt and an
unchanged one never is. :func:`run_pytest` runs pytest in a child of this interpreter with the ASan
runtime in ``LD_PRELOAD`` (Python itself is not instrumented, so the runtime must come first) and
the sanitizers set to abort at the first report.

Invariants of the child run: this module, run as ``python -m tests.support.sanitized_relay SO
ARGS``, installs the sanitized build as ``gateway._crelay`` before pytest imports anything; a
plugin fails the run unless every collected module that uses ``_crelay`` got that build, and
deselects the sanitizer test itself, so the run never recurses; the line ``MARKER`` with the
build's path proves to the parent that this happened. Leak detection is off: CPython leaks at
exit by design. A leaked relay stream is caught by ``_crelay.live_streams()`` in the tests instead.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.procs import child_env

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "gateway" / "_crelay.c"
BUILD_ROOT = ROOT / "build" / "sanitized-relay"
FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1",
         "-shared", "-fPIC", "-Wall")
MARKER = "sanitized relay in use:"
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer",
           "AddressSanitizer:DEADLYSIGNAL")
ASAN_OPTIONS = "detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1"
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"


def _gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is needed for the sanitizer build (./dev.sh installs it)")
    return gcc


def asan_runtime() -> str:
    """The ASan shared runtime of the compiler that builds the module (it must be preloaded)."""
    out = subprocess.run([_gcc(), "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    path = os.path.realpath(out.stdout.strip())
    if not os.path.isfile(path):
        raise RuntimeError(f"gcc has no ASan runtime ({out.stdout.strip()!r}); install libasan")
    return path


def build(source: Path = SOURCE) -> Path:
    """The sanitized extension for ``source``, compiled unless a build of the same inputs exists."""
    gcc = _gcc()
    include = sysconfig.get_paths()["include"]
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), repr(FLAGS).encode(), version.encode(),
                                     sys.version.encode(), include.encode()])).hexdigest()[:16]
    target = BUILD_ROOT / key / f"_crelay{sysconfig.get_config_var('EXT_SUFFIX')}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    done = subprocess.run([gcc, *FLAGS, "-I", include, str(source), "-o", str(partial), "-lpthread"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"sanitizer build of {source} failed:\n{done.stderr}")
    os.replace(partial, target)  # atomic: a concurrent run sees no build or a whole one
    for old in BUILD_ROOT.iterdir():  # keep the cache to the one current build
        if old != target.parent:
            shutil.rmtree(old, ignore_errors=True)
    return target


def run_pytest(module: Path, args: Sequence[str], env: Mapping[str, str] | None = None,
               timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run pytest with ``args`` against the sanitized ``module``; stdout and stderr together."""
    child = child_env(LD_PRELOAD=asan_runtime(), ASAN_OPTIONS=ASAN_OPTIONS, UBSAN_OPTIONS=UBSAN_OPTIONS,
                      **(env or {}))
    return subprocess.run([sys.executable, "-m", "tests.support.sanitized_relay", str(module), *args],
                          cwd=ROOT, env=child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def report_in(output: str) -> str | None:
    """The first sanitizer report in ``output`` with what follows it, or None."""
    starts = [i for i in (output.find(r) for r in REPORTS) if i >= 0]
    if not starts:
        return None
    start = output.rfind("\n", 0, min(starts)) + 1
    return output[start:start + 12_000]


# -- the child side ------------------------------------------------------------------------------
class _UseSanitizedBuild:
    """Pytest plugin: no recursion into the sanitizer test, and proof the build is the one used."""

    def __init__(self, path: str) -> None:
        self.path = path

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        skip = [i for i in items if i.nodeid.startswith("tests/gateway/test_relay_sanitized.py")]
        if skip:
            config.hook.pytest_deselected(items=skip)
            items[:] = [i for i in items if i not in skip]
        modules = {getattr(i, "module", None) for i in items}
        wrong = [m.__name__ for m in modules if m is not None and hasattr(m, "_crelay")
                 and getattr(m._crelay, "__file__", None) != self.path]
        if sys.modules["gateway._crelay"].__file__ != self.path or wrong:
            raise pytest.UsageError(f"the sanitized relay is not the one in use (modules: {wrong})")
        with open("/proc/self/maps") as maps:
            if "libasan" not in maps.read():
                raise pytest.UsageError("the ASan runtime is not loaded")
        print(f"\n{MARKER} {self.path}", flush=True)


def _main(argv: list[str]) -> int:
    path = os.path.realpath(argv[0])
    import gateway

    loader = importlib.machinery.ExtensionFileLoader("gateway._crelay", path)
    spec = importlib.util.spec_from_file_location("gateway._crelay", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gateway._crelay"] = module
    loader.exec_module(module)
    gateway._crelay = module  # type: ignore[attr-defined]
    return int(pytest.main([*argv[1:], "-p", "no:cacheprovider"], plugins=[_UseSanitizedBuild(path)]))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
