"""FSDP2 sharding of a paradigm's model (torch's ``fully_shard``), through Lightning's ModelParallelStrategy
(`FSDP2Strategy`: every process one data-parallel shard; the paradigm shards in ``configure_model``).

Wrap policy, the same for every family: each repeated block gets its own unit (the children of a ModuleList or
Sequential whose children share one class: an LM's decoder layers, a ViT's blocks, BERT's and the Q-Former's
layers), then the whole model gets one for what is left (embeddings, heads, adapters). A unit's parameters are
gathered just before its forward and freed after it, so at most one block is whole at a time. FSDP2 shards each
parameter on its own, so frozen and trained parameters (a frozen encoder beside its adapter, LoRA beside its base
weights) share a unit; LoRA adapters are injected before sharding (``StagedFreezing.setup``). FSDP2 refuses 0-d
parameters (a contrastive temperature or bias): they stay whole on every rank, their gradient averaged by a hook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of every stack of alike blocks in `model`, innermost stacks first (FSDP2 shards inside out)."""
    blocks = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and any(True for _ in module[0].parameters()):
                blocks.append(list(module))
    return [block for stack in reversed(blocks) for block in stack]


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over `mesh`. Weights keep their dtype: compute precision is the trainer's (bf16-mixed
    autocasts), as under DDP, so a recipe computes the same numbers under both. (FSDP2's own `param_dtype` would
    also cast a frozen bf16 LM's neighbours and miss parts called outside their unit's forward.)"""
    for param in model.parameters():  # FSDP2 shards contiguous tensors only (a CNN may hold channels-last weights)
        if not param.is_contiguous():
            param.data = param.data.contiguous()
    scalars = {param for param in model.parameters() if param.dim() == 0}
    for param in scalars:
        param.register_post_accumulate_grad_hook(_averaged_over(mesh))
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    return model


def _averaged_over(mesh: DeviceMesh):
    """A hook averaging a replicated parameter's gradient over the mesh, as FSDP does for the sharded ones
    (averaging is linear, so it also holds for gradients accumulated over several backward passes)."""
    group = mesh.get_group()

    def average(param: torch.nn.Parameter) -> None:
        dist.all_reduce(param.grad, group=group)  # a sum: gloo has no average
        param.grad /= dist.get_world_size(group)

    return average


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as plain FSDP2: one data-parallel dimension over every process of every
    node, no tensor parallelism (its "auto" would give each node one shard). Runs on GPUs (NCCL) and on CPUs
    (gloo). ``save_distributed_checkpoint=False`` writes one full checkpoint that `load_model` reads."""

    def __init__(self, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
