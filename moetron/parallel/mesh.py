"""ParallelDims: resolve and check the parallel degrees, build the one named DeviceMesh.

Mesh layout (outermost first), every dimension present even at size 1 so that any sub-mesh can be
named without asking which degrees are on:

    pp × dp_replicate × dp_shard_mod_ep × ep × tp

Expert parallelism borrows its ranks from dp_shard (torchtitan's scheme): dp_shard is split into
`dp_shard_mod_ep` (groups that hold the same experts) × `ep` (ranks that split the experts), and
flattened back for the dense parameters. Flattened names:
    "dp_shard" = dp_shard_mod_ep × ep     FSDP axis of dense parameters
    "dp"       = dp_replicate × dp_shard  data-parallel ranks: each reads its own slice of the batch
Experts are sharded by FSDP over (dp_replicate, dp_shard_mod_ep) only, and by `apply_ep` over "ep".
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moetron.config import ConfigError, ParallelConfig

AXES = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int  # -1 is resolved from world_size in __post_init__
    tp: int
    ep: int
    pp: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "tp", "ep", "pp", "world_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        others = self.pp * self.dp_replicate * self.tp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ConfigError(
                    f"world size {self.world_size} is not divisible by parallel.pp * dp_replicate * tp = "
                    f"{self.pp} * {self.dp_replicate} * {self.tp}, so dp_shard=-1 cannot fill it"
                )
            object.__setattr__(self, "dp_shard", self.world_size // others)
        if self.dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard={self.dp_shard} must be >= 1 (or -1)")
        product = others * self.dp_shard
        if product != self.world_size:
            raise ConfigError(
                f"parallel.pp * dp_replicate * dp_shard * tp = {self.pp} * {self.dp_replicate} * "
                f"{self.dp_shard} * {self.tp} = {product} must equal the world size {self.world_size} "
                "(the number of processes torchrun started)"
            )
        if self.dp_shard % self.ep:
            raise ConfigError(
                f"parallel.ep={self.ep} must divide parallel.dp_shard={self.dp_shard} "
                "(expert parallelism borrows its ranks from dp_shard)"
            )

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        return cls(cfg.dp_replicate, cfg.dp_shard, cfg.tp, cfg.ep, cfg.pp, world_size)

    @property
    def dp_degree(self) -> int:
        """Data-parallel ranks, each reading a different slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_degree > 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "tp": self.tp,
            "ep": self.ep,
            "pp": self.pp,
        }

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The world mesh with dimensions AXES plus the flattened "dp_shard" and "dp"."""
        sizes = (self.pp, self.dp_replicate, self.dp_shard_mod_ep, self.ep, self.tp)
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=AXES)
        mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
        mesh["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")
        return mesh
