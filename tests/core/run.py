# Runs the portable core's tests under the MicroPython unix port.
# CPython runs the very same files through pytest; here a test is any module-level
# function named test_* in tests/core/test_*.py, and a failure is any exception.
# Usage (from the repo root): micropython tests/core/run.py [name-filter]
import os
import sys

sys.path.insert(0, "firmware")
sys.path.insert(0, "tests/core")


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    passed = failed = 0
    for fname in sorted(os.listdir("tests/core")):
        if not (fname.startswith("test_") and fname.endswith(".py")):
            continue
        mod = __import__(fname[:-3])
        for name in sorted(dir(mod)):
            if not name.startswith("test_") or only not in fname + "::" + name:
                continue
            fn = getattr(mod, name)
            try:
                fn()
                passed += 1
            except Exception as exc:  # report every failure, keep going
                failed += 1
                print("FAIL", fname + "::" + name, repr(exc))
                sys.print_exception(exc)
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed or not passed else 0)


main()
