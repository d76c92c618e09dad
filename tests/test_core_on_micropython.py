# The portable core's tests, run again under the MicroPython unix port with a 64 KB heap.
# Firmware and test modules are compiled with mpy-cross first, as a device runs bytecode;
# each test module runs in its own process so one module's code does not count against
# another's heap.
import os
import subprocess

import pytest

from conftest import ROOT
from simulator.build import mpy_cross_cmd

CORE = os.path.join(ROOT, "tests", "core")
MODULES = sorted(f[:-3] for f in os.listdir(CORE) if f.startswith("test_") and f.endswith(".py"))


@pytest.fixture(scope="module")
def bytecode(tmp_path_factory):
    out = tmp_path_factory.mktemp("core-mpy")
    sources = []
    for folder in (os.path.join(ROOT, "firmware"), os.path.join(ROOT, "firmware", "evaluator"), CORE):
        for name in os.listdir(folder):
            if name.endswith(".py") and name not in ("run.py", "conftest.py", "build_ui.py"):
                sources.append(os.path.join(folder, name))
    for src in sources:
        rel = os.path.relpath(src, os.path.join(ROOT, "firmware"))
        if rel.startswith(".."):
            rel = os.path.basename(src)
        dst = os.path.join(str(out), rel[:-3] + ".mpy")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        subprocess.run([mpy_cross_cmd(), "-o", dst, src], check=True)
    return str(out)


@pytest.mark.parametrize("module", MODULES)
def test_core_module_passes_under_micropython_with_64k_heap(micropython, bytecode, module):
    proc = subprocess.run([micropython, "-X", "heapsize=64K", "tests/core/run.py",
                           "--lib", bytecode, module + ".py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed, 0 failed" in proc.stdout
