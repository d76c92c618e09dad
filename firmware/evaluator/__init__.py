# The portable core of the counter evaluator.
# Runs unchanged on MicroPython >= 1.22 and CPython >= 3.11: no machine/network imports,
# no f-strings in hot paths, only relative imports inside the package.
VERSION = "0.1.0"
