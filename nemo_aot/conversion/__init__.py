"""Hugging Face <-> .nemo conversion (Llama 2/3/3.x, Mistral, Qwen2/2.5).

Importing this package is cheap; megatron-core loads when a conversion runs.
"""

from nemo_aot.conversion.convert import hf_to_nemo, nemo_to_hf

__all__ = ["hf_to_nemo", "nemo_to_hf"]
