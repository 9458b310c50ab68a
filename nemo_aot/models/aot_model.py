"""``MegatronGPTAOTModel``: a NeMo model holding megatron-core GPTModel chunks, trained with AOT.

The class is a ``nemo.core.ModelPT`` (so it saves and restores as a ``.nemo`` and carries its
config), and exposes the small interface the trainer depends on:

    prepare_for_training_step()          zero the DDP grad buffers
    get_loss_and_metrics(mbs, forward_only, collect_rewards=False) -> StepResult
                                         forward(/backward) of one global batch: metrics, their
                                         additive pieces, per-sample rewards when collected
    finish_training_step()               nothing to do after the optimizer step today
    attach_reference(mbs)                add reference log-probs to micro-batches
    sharded_state_dict()                 megatron dist-checkpoint view of the trained weights
                                         (the adapters only under LoRA)

Parallel state must be initialized (``nemo_aot.distributed.parallel.initialize_model_parallel``)
before construction. The chunks are wrapped in megatron-core DDP; the optimizer is built by the
trainer on top of ``self.chunks``. With ``peft.scheme=lora`` the base weights are frozen
before the DDP wrap, so DDP's buckets, the optimizer and its (distributed) state see the
adapters only (``nemo_aot.models.lora``).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_aot.distributed.parallel import ParallelConfig
from nemo_aot.losses.config import AlignmentConfig
from nemo_aot.models.aot_step import AOTStep, StepResult
from nemo_aot.models.config import GPTModelConfig, to_transformer_config
from nemo_aot.models.gpt import build_model_chunks
from nemo_aot.models.lora import MERGED, adapter_sharded_state_dict, freeze_base, is_adapter_name
from nemo_aot.models.options import PeftConfig, PrecisionConfig
from nemo_aot.models.performance import PerformanceConfig, transformer_overrides
from nemo_aot.models.reference import (
    AdaptersOffReference,
    CpuSwapReference,
    ReferenceTable,
    attach_reference,
)

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


RUNTIME_SECTIONS = ("precision", "parallel", "alignment", "peft")


def architecture_from_cfg(cfg: DictConfig) -> GPTModelConfig:
    """The flat architecture keys of a model cfg (NeMo MegatronGPTModel layout)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(GPTModelConfig)}
    flat = OmegaConf.to_container(cfg, resolve=True)
    return GPTModelConfig.from_dict({k: v for k, v in flat.items() if k in known})


def model_cfg_node(model: GPTModelConfig, precision: PrecisionConfig, parallel: ParallelConfig,
                   alignment: AlignmentConfig, peft: Optional[PeftConfig] = None) -> DictConfig:
    """The ModelPT cfg: architecture keys at the top level (as NeMo's model_config.yaml has
    them) plus the run-time sections."""
    import dataclasses

    node = OmegaConf.create(model.to_dict())
    sections = (precision, parallel, alignment, peft or PeftConfig())
    for name, section in zip(RUNTIME_SECTIONS, sections):
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
    """A Llama-family GPT policy on megatron-core, aligned with AOT / DPO / IPO."""

    def __init__(self, cfg: DictConfig, trainer=None, *, use_distributed_optimizer: bool = False,
                 seed: int = 1234, performance: Optional[PerformanceConfig] = None):
        super().__init__(cfg=cfg, trainer=trainer)
        self.performance = performance or PerformanceConfig()
        self.model_cfg = architecture_from_cfg(cfg)
        self.precision_cfg = PrecisionConfig(**OmegaConf.to_container(cfg.precision, resolve=True))
        self.parallel_cfg = ParallelConfig(**OmegaConf.to_container(cfg.parallel, resolve=True))
        self.alignment = AlignmentConfig(**OmegaConf.to_container(cfg.alignment, resolve=True))
        self.peft = PeftConfig(**OmegaConf.to_container(cfg.peft, resolve=True)) \
            if "peft" in cfg else PeftConfig()
        self.peft.validate()
        self.precision_cfg.validate()
        self.precision_cfg.check_runtime()
        self.alignment.validate()
        self.transformer_config = to_transformer_config(
            self.model_cfg, self.parallel_cfg, self.precision_cfg.precision,
            **fp8_overrides(self.precision_cfg),
            **transformer_overrides(self.performance, self.precision_cfg.transformer_impl,
                                    self.model_cfg.attention_backend))
        chunks = build_model_chunks(self.model_cfg, self.transformer_config,
                                    self.precision_cfg.transformer_impl, peft=self.peft, seed=seed)
        if self.peft.enabled:  # before DDP: its buffers hold the trainable parameters only
            freeze_base(chunks)
        self.chunks = torch.nn.ModuleList(self._wrap_ddp(chunks, use_distributed_optimizer))
        self.step_runner = AOTStep(
            list(self.chunks), self.transformer_config, vocab_size=self.model_cfg.vocab_size,
            padded_vocab_size=self.model_cfg.padded_vocab_size(
                self.parallel_cfg.tensor_model_parallel_size),
            alignment=self.alignment)
        self.reference_tables: dict[str, ReferenceTable] = {}
        self.cpu_swap: Optional[CpuSwapReference] = None
        self.adapters_off = AdaptersOffReference(list(self.chunks)) \
            if self.alignment.reference_policy == "adapters_off" else None

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
        """Finish the parameter all-gather that overlap_param_gather defers to the next forward
        (collective). Code that reads the weights without a forward (checkpoint, export, the
        cpu_swap reference) calls it first; a forward gathers through megatron's pre-hooks."""
        for chunk in self.chunks:
            if chunk.ddp_config.overlap_param_gather:
                chunk.start_param_sync(force_sync=True)

    # ------------------------------------------------------------------ trainer interface
    def prepare_for_training_step(self) -> None:
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()

    def get_loss_and_metrics(self, micro_batches: list[dict], forward_only: bool,
                             collect_rewards: bool = False) -> StepResult:
        if forward_only:
            for chunk in self.chunks:
                chunk.eval()
            with torch.no_grad():
                return self.step_runner.step(micro_batches, forward_only=True,
                                             collect_rewards=collect_rewards)
        return self.step_runner.step(micro_batches, forward_only=False,
                                     collect_rewards=collect_rewards)

    def finish_training_step(self) -> None:
        pass

    def attach_reference(self, micro_batches: list[dict], split: str = "train") -> list[dict]:
        if self.alignment.reference_policy == "cpu_swap":
            if self.cpu_swap is None:
                raise RuntimeError("cpu_swap reference not set up: call enable_cpu_swap() first")
            self.sync_params()  # the policy's weights are parked and restored as they are
            table = self.cpu_swap.score_step(self.step_runner, micro_batches)
        elif self.alignment.reference_policy == "adapters_off":
            table = self.adapters_off.score_step(self.step_runner, micro_batches)
        else:
            if split not in self.reference_tables:
                raise RuntimeError(f"cached reference for split {split!r} not set up")
            table = self.reference_tables[split]
        return attach_reference(micro_batches, table, self.alignment.length_normalize)

    def enable_cpu_swap(self) -> None:
        """Snapshot the current weights as the reference (call before any update)."""
        self.cpu_swap = CpuSwapReference(list(self.chunks))

    def score(self, micro_batches: list[dict]):
        for chunk in self.chunks:
            chunk.eval()
        return self.step_runner.score(micro_batches)

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
                     parallel: Optional[ParallelConfig] = None,
                     alignment: Optional[AlignmentConfig] = None, seed: int = 1234):
        """Build the model from a .nemo at the current (or given) parallel layout.

        Our own loader replaces NeMo's SaveRestoreConnector: it never instantiates classes
        named in the file (NeMo 3.0's ``_target_`` allow-list stays on and is never needed),
        never unpickles code, and reads the weights at any TP/PP layout.
        """
        from nemo_aot.distributed.parallel import initialize_model_parallel
        from nemo_aot.models.nemo_format import read_nemo_config

        if save_restore_connector is not None or override_config_path is not None:
            raise ValueError("restore_from: custom connectors and config overrides are not "
                             "supported; pass precision/parallel/alignment instead")
        model_cfg, full = read_nemo_config(restore_path)
        precision = precision or PrecisionConfig(
            precision="fp32" if not torch.cuda.is_available() else "bf16")
        parallel = parallel or ParallelConfig()
        alignment = alignment or AlignmentConfig()
        node = model_cfg_node(model_cfg, precision, parallel, alignment)
        if return_config:
            return node
        initialize_model_parallel(parallel, model_cfg, seed=seed)
        model = cls(node, trainer=trainer)
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
