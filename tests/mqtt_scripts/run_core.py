# Runs one MQTT core test module under the MicroPython unix port from precompiled .mpy
# files, as a device loads them: compiling firmware/mqtt.py from source needs more RAM than
# the 64 KB heap the device has. tests/test_mqtt_client.py compiles and starts this, one
# process per module so each gets the whole heap.
# Usage: micropython -X heapsize=64K run_core.py <dir holding the .mpy files> <module>
import gc
import sys


def main():
    sys.path.insert(0, sys.argv[1])
    mod = __import__(sys.argv[2])
    passed = failed = 0
    for name in sorted(dir(mod)):
        if not name.startswith("test_"):
            continue
        gc.collect()  # each test starts from a compacted heap, as a fresh boot would
        try:
            getattr(mod, name)()
            passed += 1
        except Exception as exc:  # report every failure, keep going
            failed += 1
            print("FAIL", name, repr(exc))
            sys.print_exception(exc)
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed or not passed else 0)


main()
