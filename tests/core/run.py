# Runs the portable core's tests under the MicroPython unix port.
# CPython runs the very same files through pytest; here a test is any module-level
# function named test_* in a tests/core/test_*.py module, and a failure is any exception.
# Usage (from the repo root):
#   micropython tests/core/run.py [--lib DIR]... [module-name-filter [test-name-filter]]
# --lib puts a folder of mpy-cross output first on sys.path: a device runs bytecode, and
# compiling every module from source inside a 64 KB heap is not what a device does.
import os
import sys

sys.path.insert(0, "firmware")
sys.path.insert(0, "tests/core")


def main():
    args = sys.argv[1:]
    while args and args[0] == "--lib":
        sys.path.insert(0, args[1])
        args = args[2:]
    only_mod = args[0] if args else ""
    only_test = args[1] if len(args) > 1 else ""
    passed = failed = 0
    for fname in sorted(os.listdir("tests/core")):
        if not (fname.startswith("test_") and fname.endswith(".py")) or only_mod not in fname:
            continue
        mod = __import__(fname[:-3])
        for name in sorted(dir(mod)):
            if not name.startswith("test_") or only_test not in name:
                continue
            try:
                getattr(mod, name)()
                passed += 1
            except Exception as exc:  # report every failure, keep going
                failed += 1
                print("FAIL", fname + "::" + name, repr(exc))
                sys.print_exception(exc)
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed or not passed else 0)


main()
