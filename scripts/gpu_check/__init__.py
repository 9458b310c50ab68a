"""The prepared check of nemo_aot on one lent GPU machine (README.md in this folder).

``build_bundle`` makes the wheel bundle here (the machine has no network), ``run.sh`` installs
it there and runs the GPU tests, a short training and the step benchmark, ``summarize`` writes
what passed. Run the Python parts with ``python -m scripts.gpu_check.<module>`` from the
repository root.
"""
