# The portable core's tests, run again under the MicroPython unix port with a 64 KB heap.
import subprocess

from conftest import ROOT


def test_core_tests_pass_under_micropython_with_64k_heap(micropython):
    proc = subprocess.run([micropython, "-X", "heapsize=64K", "tests/core/run.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed, 0 failed" in proc.stdout
