"""apply_fsdp: FSDP2 `fully_shard` per transformer block and on the root (HSDP on a 2-D mesh).

With expert parallelism the experts of each MoE layer are sharded by FSDP over the data-parallel
ranks *outside* their ep group only (dp_replicate × dp_shard_mod_ep): inside it they are already
split by `apply_ep`, whose DTensors live on the same root mesh, so FSDP composes with them as
with TP (2-D sharding).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def mixed_precision_policy(dtype: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction (and fp32 master weights in the optimizer); in
    fp32 nothing is cast."""
    if dtype == "bfloat16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy,
    expert_dp_mesh: DeviceMesh | None = None,
    gradient_divide_factor: int = 1,
    reshard_after_forward: bool = True,
) -> None:
    """Shard `model` (a Transformer or a pipeline stage of one) over `dp_mesh`.

    dp_mesh: 1-D ("dp_shard") for FSDP, 2-D ("dp_replicate", "dp_shard") for HSDP.
    expert_dp_mesh: with expert parallelism, the mesh the experts are FSDP-sharded on; their
      gradients are averaged over every data-parallel rank (`gradient_divide_factor`), not just
      over that mesh, since each expert also receives the tokens of the other ep ranks.
    reshard_after_forward: False under pipelining, where each microbatch would regather.
    """
    if expert_dp_mesh is not None:
        from moetron.parallel.expert_parallel import fully_shard_experts

        fully_shard_experts(
            model,
            expert_dp_mesh,
            gradient_divide_factor,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
        )
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # The root holds the embeddings, final norm and output head; kept gathered after the forward,
    # since the backward starts with them.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)
