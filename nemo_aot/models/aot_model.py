"""``MegatronGPTAOTModel``: the policy - a NeMo model holding megatron-core GPTModel chunks.

The class is a ``nemo.core.ModelPT`` (so it saves and restores as a ``.nemo`` and carries its
config). It is built from typed, already resolved parts (``nemo_aot.algorithms.resolve``) and
knows no objective and no reference: the trainer wires three named parts,

    policy      this class: forward(/backward) of a global batch through megatron's schedule
                and per-sequence log-probs on the last stage (``PolicyRunner``)
    objective   the loss on those log-probs (``nemo_aot.algorithms.objective``; SFT's in
                ``nemo_aot.algorithms.sft``): ``objective.step(policy, micro_batches)``
    reference   reference log-probs attached to each micro-batch as data
                (``nemo_aot.models.reference``)

and depends on this small interface of the policy:

    prepare_for_training_step()          train mode, zero the DDP grad buffers
    finish_training_step()               nothing to do after the optimizer step today
    evaluating()                         eval mode and no autograd within the block
    forward_backward(mbs, loss_for, forward_only), sequence_logps(output, mb), score(mbs)
    sharded_state_dict()                 megatron dist-checkpoint view of the trained weights
                                         (the adapters only under LoRA)

Parallel state must be initialized (``nemo_aot.distributed.parallel.initialize_model_parallel``)
before construction. The chunks are wrapped in megatron-core DDP; the optimizer is built by the
trainer on top of ``self.chunks``. With ``peft.scheme=lora`` the base weights are frozen
before the DDP wrap, so DDP's buckets, the optimizer and its (distributed) state see the
adapters only (``nemo_aot.models.lora``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_aot.distributed.parallel import ParallelConfig
from nemo_aot.models.config import GPTModelConfig, to_transformer_config
from nemo_aot.models.gpt import build_model_chunks
from nemo_aot.models.lora import MERGED, adapter_sharded_state_dict, freeze_base, is_adapter_name
from nemo_aot.models.options import PeftConfig, PrecisionConfig
from nemo_aot.models.performance import PerformanceConfig, transformer_overrides
from nemo_aot.models.policy_runner import PolicyRunner

logger = logging.getLogger(__name__)

try:  # NeMo is a hard dependency of the product, but keep the error readable.
    from nemo.core.classes.modelPT import ModelPT
except ImportError as err:  # pragma: no cover
    raise ImportError("nemo_aot needs nemo-toolkit (pip install 'nemo-toolkit[core]')") from err


def fp8_overrides(precision: PrecisionConfig) -> dict:
    if precision.fp8 is None:
        return {}
    return dict(fp8=precision.fp8, fp8_recipe=precision.fp8_recipe,
                fp8_amax_history_len=precision.fp8_amax_history_len,
                fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
                fp8_param=precision.fp8_param)


def model_cfg_node(model: GPTModelConfig, precision: PrecisionConfig, parallel: ParallelConfig,
                   peft: PeftConfig) -> DictConfig:
    """The ModelPT cfg, written from the typed parts (never read back): architecture keys at
    the top level (as NeMo's model_config.yaml has them) plus the run-time sections."""
    node = OmegaConf.create(model.to_dict())
    for name, section in (("precision", precision), ("parallel", parallel), ("peft", peft)):
        node[name] = dataclasses.asdict(section)
    return node


def load_nemo_into(path: str, chunks: list) -> None:
    """Read the weights of a .nemo file or extracted .nemo folder into model chunks at the
    current layout (collective; a file is extracted once per node, see ``open_nemo``). A .nemo
    holds a plain model: LoRA adapters of the chunks keep their values."""
    from nemo_aot.models.nemo_format import load_nemo_weights, open_nemo

    with open_nemo(path) as extracted:
        load_nemo_weights(chunks, extracted, select=lambda name: not is_adapter_name(name))


class MegatronGPTAOTModel(ModelPT):
    """A Llama-family GPT policy on megatron-core, for preference alignment."""

    def __init__(self, model: GPTModelConfig, *, precision: Optional[PrecisionConfig] = None,
                 parallel: Optional[ParallelConfig] = None, peft: Optional[PeftConfig] = None,
                 performance: Optional[PerformanceConfig] = None,
                 logprobs_from: str = "hidden_states", logprob_chunk_size: int = 1024,
                 use_distributed_optimizer: bool = False, seed: int = 1234, trainer=None):
        """``model`` and the sections come resolved (``nemo_aot.algorithms.resolve``): nothing
        is validated again here. ``logprobs_from`` and ``logprob_chunk_size``: how the last stage
        turns its output into log-probs (``alignment.*`` of a run)."""
        precision, parallel = precision or PrecisionConfig(), parallel or ParallelConfig()
        peft, performance = peft or PeftConfig(), performance or PerformanceConfig()
        super().__init__(cfg=model_cfg_node(model, precision, parallel, peft), trainer=trainer)
        self.model_cfg, self.precision_cfg, self.parallel_cfg = model, precision, parallel
        self.peft, self.performance = peft, performance
        precision.check_runtime()  # the host, not the config: TE present, FP8-capable GPU
        self.transformer_config = to_transformer_config(
            model, parallel, precision.precision, **fp8_overrides(precision),
            **transformer_overrides(performance, precision.transformer_impl,
                                    model.attention_backend))
        chunks = build_model_chunks(model, self.transformer_config, precision.transformer_impl,
                                    peft=peft, seed=seed)
        if peft.enabled:  # before DDP: its buffers hold the trainable parameters only
            freeze_base(chunks)
        self.chunks = torch.nn.ModuleList(self._wrap_ddp(chunks, use_distributed_optimizer))
        self.runner = PolicyRunner(
            list(self.chunks), self.transformer_config, vocab_size=model.vocab_size,
            padded_vocab_size=model.padded_vocab_size(parallel.tensor_model_parallel_size),
            logprobs_from=logprobs_from, logprob_chunk_size=logprob_chunk_size)

    def _wrap_ddp(self, chunks, use_distributed_optimizer: bool):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from nemo_aot.distributed.parallel import compute_device

        config = self.transformer_config
        # Built on the CPU (use_cpu_initialization: layout-independent init); DDP allocates its
        # grad buffers where the parameters are, so move them first.
        chunks = [c.to(compute_device()) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
            average_in_collective=False, **self.performance.ddp_kwargs(use_distributed_optimizer))
        wrapped = [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
                   for i, c in enumerate(chunks)]
        # As Megatron-LM's training.py: one function per chunk, or the function itself for one.
        def per_chunk(name):
            funcs = [getattr(c, name) for c in wrapped]
            return funcs if len(funcs) > 1 else funcs[0]

        config.finalize_model_grads_func = finalize_model_grads  # waits for the reductions
        config.no_sync_func = per_chunk("no_sync")
        if ddp_config.overlap_grad_reduce:
            # the pipeline schedules start each chunk's reduction at aligned points of the
            # schedule (Megatron-LM's default align_grad_reduce)
            config.grad_sync_func = per_chunk("start_grad_sync")
        if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
            # the interleaved schedule starts each chunk's all-gather at aligned points
            config.param_sync_func = per_chunk("start_param_sync")
        return wrapped

    def sync_params(self) -> None:
        """See ``PolicyRunner.sync_params`` (collective)."""
        self.runner.sync_params()

    # ------------------------------------------------------------------ trainer interface
    def prepare_for_training_step(self) -> None:
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()

    def finish_training_step(self) -> None:
        pass

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout) and no autograd within the block; train mode after it."""
        for chunk in self.chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for chunk in self.chunks:
                chunk.train()

    def forward_backward(self, micro_batches: list[dict], loss_for, forward_only: bool) -> list:
        """See ``PolicyRunner.forward_backward``."""
        return self.runner.forward_backward(micro_batches, loss_for, forward_only)

    def sequence_logps(self, output: torch.Tensor, micro_batch: dict, with_logits: bool = False):
        """See ``PolicyRunner.sequence_logps``."""
        return self.runner.sequence_logps(output, micro_batch, with_logits)

    def score(self, micro_batches: list[dict]):
        """Per micro-batch (label, sample_index, summed log-prob, token count), eval mode."""
        with self.evaluating():
            return self.runner.score(micro_batches)

    def sharded_state_dict(self, prefix: str = "", **kwargs) -> dict:
        """The trained weights: every weight, or under LoRA the adapters only (the frozen base
        comes from init_from, so checkpoints hold what the optimizer changes)."""
        self.sync_params()  # collective, as every caller (a checkpoint save or load) is
        if len(self.chunks) == 1:
            state = self.chunks[0].module.sharded_state_dict(prefix=prefix)
        else:
            state = {f"model{i}": c.module.sharded_state_dict(prefix=prefix)
                     for i, c in enumerate(self.chunks)}
        return adapter_sharded_state_dict(state) if self.peft.enabled else state

    def load_sharded_state(self, state: dict) -> None:
        parts = [state] if len(self.chunks) == 1 else \
            [state[f"model{i}"] for i in range(len(self.chunks))]
        for chunk, part in zip(self.chunks, parts):
            missing, unexpected = chunk.module.load_state_dict(part, strict=not self.peft.enabled)
            # Under LoRA a checkpoint holds exactly the adapters; the base stays as loaded.
            stray = [k for k in missing if is_adapter_name(k)] + list(unexpected)
            if stray:
                raise ValueError(f"checkpoint does not fit the model's adapters: {stray[:4]}")

    # ------------------------------------------------------------------ .nemo
    def save_to(self, save_path: str, tokenizer_dir: Optional[str] = None) -> None:
        """Write a .nemo (collective: every rank calls it). See nemo_aot.models.nemo_format."""
        from nemo_aot.models.nemo_format import save_nemo

        save_nemo(save_path, self.model_cfg, self.export_state_dict(), tokenizer_dir)

    def export_state_dict(self) -> dict:
        """The policy as a plain model's sharded weights (``model.`` keys): under LoRA the base
        weights with ``(alpha / r) B A`` added, no adapter entries (the base is unchanged)."""
        from nemo_aot.models.nemo_format import nemo_sharded_state_dict

        self.sync_params()  # collective, as every caller (save_to, export) is
        return nemo_sharded_state_dict(list(self.chunks),
                                       metadata={MERGED: True} if self.peft.enabled else None)

    @classmethod
    def restore_from(cls, restore_path: str, override_config_path=None, map_location=None,
                     strict: bool = True, return_config: bool = False, trainer=None,
                     save_restore_connector=None, *, precision: Optional[PrecisionConfig] = None,
                     parallel: Optional[ParallelConfig] = None, seed: int = 1234):
        """Build the model from a .nemo at the current (or given) parallel layout.

        Our own loader replaces NeMo's SaveRestoreConnector: it never instantiates classes
        named in the file (NeMo 3.0's ``_target_`` allow-list stays on and is never needed),
        never unpickles code, and reads the weights at any TP/PP layout.
        """
        from nemo_aot.distributed.parallel import initialize_model_parallel
        from nemo_aot.models.nemo_format import read_nemo_config

        if save_restore_connector is not None or override_config_path is not None:
            raise ValueError("restore_from: custom connectors and config overrides are not "
                             "supported; pass precision/parallel instead")
        model_cfg, _ = read_nemo_config(restore_path)
        precision = precision or PrecisionConfig(
            precision="fp32" if not torch.cuda.is_available() else "bf16")
        parallel = parallel or ParallelConfig()
        if return_config:
            return model_cfg_node(model_cfg, precision, parallel, PeftConfig())
        initialize_model_parallel(parallel, model_cfg, seed=seed)
        model = cls(model_cfg, precision=precision, parallel=parallel, seed=seed,
                    trainer=trainer)
        load_nemo_into(restore_path, list(model.chunks))
        return model

    # ------------------------------------------------------------------ NeMo plumbing
    def setup_training_data(self, train_data_config):
        """Data is owned by the AOT trainer (nemo_aot.data); nothing to set up here."""

    def setup_validation_data(self, val_data_config):
        """Data is owned by the AOT trainer (nemo_aot.data); nothing to set up here."""

    @classmethod
    def list_available_models(cls):
        return None
