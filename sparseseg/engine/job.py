"""The plan every prediction makes, `sparseseg-infer` and `sparseseg.predict` alike: the kernels,
the block, tile and batch for this contract, volume and device, and from them the BlockJob the
workers run."""

from __future__ import annotations

from dataclasses import dataclass

from sparseseg.engine.backends.base import BackendSpec
from sparseseg.engine.plan import choose, gather_normalization
from sparseseg.engine.worker import BlockJob
from sparseseg.kernels.select import check_kernels, kernels_option
from sparseseg.model.contract import geometry_of_contract


@dataclass(frozen=True)
class JobPlan:
    contract: dict
    spec: BackendSpec
    device: str             # cpu | cuda: where the tiles run
    kernels: str            # torch | cuda
    block: tuple
    tile: tuple
    batch: int
    overlap: float

    @property
    def geometry(self):
        return geometry_of_contract(self.contract)

    def block_job(self, volume, source: str, output: str, probabilities, **extra) -> BlockJob:
        """The BlockJob for `volume` (statistics for a gather that normalizes taken here, once)."""
        return BlockJob(source, output, self.spec, self.geometry.to_dict(), tuple(volume.shape), self.tile,
                        self.overlap, self.batch, probabilities, normalization=gather_normalization(self.contract, volume),
                        kernels=self.kernels, **extra)


def plan_job(contract: dict, shape, spec: BackendSpec, device: str, *, kernels=None, block=None, tile=None,
             batch=None, overlap: float = 0.5) -> JobPlan:
    """Check the kernels against the device, then choose block, tile and batch (plan.choose)."""
    kernels = kernels_option(kernels)
    check_kernels(kernels, device)
    blk, tile, batch = choose(contract, shape, device=device, block=block, tile=tile, batch=batch, overlap=overlap,
                              precision=spec.precision)
    return JobPlan(contract, spec, device, kernels, blk, tile, batch, overlap)
