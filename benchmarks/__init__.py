"""Benchmarks of nemo_aot against other training stacks; each is a package run as a module from
the repository root (``python -m benchmarks.aot_step``). Results land in ``benchmarks/results/``."""
