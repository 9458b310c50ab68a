"""Hugging Face <-> .nemo conversion, one file per model family (:mod:`.families`).

Importing this package is cheap; megatron-core loads when a conversion runs.
"""

from nemo_aot.conversion.convert import hf_to_nemo, nemo_to_hf

__all__ = ["hf_to_nemo", "nemo_to_hf"]
