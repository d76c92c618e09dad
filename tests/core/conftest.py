# Under CPython the core is imported as the device sees it: `evaluator` from firmware/.
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "firmware"))
os.chdir(ROOT)
