"""What every variant shares: the model shapes, the batch, the initial weights and the device."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

import torch

from nemo_aot.models.config import GPTModelConfig, RopeScaling

LR = 1e-5
LLAMA32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
SHAPES = {
    # Llama-style, tied embeddings like Llama-3.2-1B, small enough for two CPU cores.
    "tiny": dict(pairs=4, seq=64, model=GPTModelConfig(
        num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
        num_query_groups=4, vocab_size=4096, share_embeddings_and_output_weights=True)),
    # Llama-3.2-1B: the anchor shape.
    "llama-1b": dict(pairs=4, seq=1024, model=GPTModelConfig(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
        num_query_groups=8, vocab_size=128256, rotary_base=500000.0, rope_scaling=LLAMA32_ROPE,
        share_embeddings_and_output_weights=True, max_position_embeddings=131072)),
    # Llama-3-8B widths with a few layers (--layers), to fit one card next to HF.
    "llama-8b-layer-slice": dict(pairs=4, seq=1024, model=GPTModelConfig(
        num_layers=4, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=128256, rotary_base=500000.0,
        max_position_embeddings=8192)),
}


class Unavailable(Exception):
    """A variant that cannot run here (a missing optional package); recorded as skipped."""


@dataclasses.dataclass
class Variant:
    step: Callable[[], float]
    """One training step; returns its loss."""
    reference_forward: bool
    """Whether the step runs a reference forward (counted as no-grad FLOPs)."""


@dataclasses.dataclass
class Bench:
    """What every variant shares: arguments, model shape, device, initial weights, batch."""

    args: argparse.Namespace
    model_cfg: GPTModelConfig
    device: torch.device
    precision: str
    state: dict  # megatron-core state dict (TP=1) of the initial weights, on the CPU
    batch: list  # micro-batches in nemo_aot.data.collate's layout, on the CPU

    @property
    def dtype(self) -> torch.dtype:
        from nemo_aot.models.config import params_dtype

        return params_dtype(self.precision)

    def micro_batches(self) -> list[dict]:
        """A fresh copy of the batch on the device (variants write their reference log-probs)."""
        return [{k: v.to(self.device) for k, v in mb.items()} for mb in self.batch]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def model_config(args: argparse.Namespace) -> GPTModelConfig:
    """The shape's architecture with --layers and --seq applied."""
    shape = SHAPES[args.shape]["model"]
    return dataclasses.replace(shape, num_layers=args.layers or shape.num_layers,
                               encoder_seq_length=args.seq,
                               max_position_embeddings=max(args.seq, shape.max_position_embeddings))


def make_batch(pairs: int, seq: int, vocab: int, micro_batches: int, seed: int) -> list[dict]:
    """Random pairs (chosen rows, then rejected rows per micro-batch); a pair shares its prompt,
    the first quarter of the sequence; every row is full length (no padding)."""
    g = torch.Generator().manual_seed(seed)
    prompt = max(1, seq // 4)
    tokens = torch.randint(0, vocab, (2 * pairs, seq + 1), generator=g)
    tokens[pairs:, :prompt] = tokens[:pairs, :prompt]
    per = pairs // micro_batches
    out = []
    for m in range(micro_batches):
        index = torch.arange(m * per, (m + 1) * per)
        rows = tokens[torch.cat([index, pairs + index])]
        n = rows.shape[0]
        loss_mask = torch.zeros(n, seq)
        loss_mask[:, prompt - 1:] = 1.0  # labels[:, t] = input_ids[:, t + 1]
        labels = rows[:, 1:].contiguous()
        out.append({
            "input_ids": rows[:, :-1].contiguous(), "labels": labels, "loss_mask": loss_mask,
            "position_ids": torch.arange(seq).expand(n, seq).contiguous(),
            "seq_lengths": torch.full((n,), seq), "prompt_lengths": torch.full((n,), prompt),
            "label": torch.arange(n) < per, "pair_index": torch.full((n,), -1),
            "sample_index": torch.cat([index, index]), "sample_weight": torch.ones(n),
            "reward": torch.full((n,), float("nan")), "reference_logps": torch.zeros(n),
            # Hugging Face inputs: TRL passes the attention mask; the fused head takes
            # pre-shifted labels with -100 outside the response.
            "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "shift_labels": labels.masked_fill(loss_mask == 0, -100)})
    return out


def initial_state(model_cfg: GPTModelConfig, precision: str) -> dict:
    """One megatron-core model's freshly initialized weights (TP=1, on the CPU)."""
    from nemo_aot.distributed.parallel import ParallelConfig
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks

    config = to_transformer_config(model_cfg, ParallelConfig(), precision)
    (model,) = build_model_chunks(model_cfg, config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def load_state(module: torch.nn.Module, state: dict) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"initial weights do not fit: missing {missing}, "
                           f"unexpected {unexpected}")
