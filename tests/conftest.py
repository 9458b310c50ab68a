import os
import sys

# Make tests/multirank.py importable from every tier as `multirank`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Many processes share 2 cores in CI; oversubscribed BLAS threads only slow them down.
os.environ.setdefault("OMP_NUM_THREADS", "1")
