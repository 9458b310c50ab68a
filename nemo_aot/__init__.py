"""nemo_aot: Alignment via Optimal Transport (arXiv 2406.05882) on NeMo and megatron-core."""

__version__ = "0.1.0"
