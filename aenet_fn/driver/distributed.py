"""Data-parallel training over processes with ``torch.distributed`` (DDP-style).

Launch the same script on K processes (``torchrun --nproc_per_node=K script.py``, any backend:
``gloo`` on CPU, ``nccl`` on GPUs) and call ``torch.distributed.init_process_group`` before
:func:`aenet_fn.fit`; the driver then splits every mini-batch across the processes:

* every process draws the same epoch plan (same seed, same sampler state), so the sampling
  policies keep their meaning: a global batch is the batch a single process would draw;
* each process takes a contiguous share of the batch's structures and computes its error sums;
  the sums are all-reduced before the loss, so each process's loss *value* is the global one,
  while its gradient is that of its own share: all-reducing the gradients gives the exact
  gradient of the global batch loss (RMSEs are not means of per-process RMSEs);
* every process then applies the same optimiser update, so parameters stay identical;
* epoch metrics, error-weighted scores and validation errors are reduced over processes;
  callbacks (checkpoints, progress, logs) run on rank 0 only.

A 2-process run therefore equals a 1-process run with the same global batch, to round-off.
"""

from __future__ import annotations

import attrs
import torch
import torch.distributed as dist

from aenet_fn.core.loss import ErrorSums, Residuals, loss_from_sums


@attrs.frozen
class World:
    """The processes of a data-parallel run.

    Attributes:
        rank: this process, ``0 <= rank < size``.
        size: number of processes (1: not distributed).
    """

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints and logs (rank 0)."""
        return self.rank == 0


def current_world() -> World:
    """The initialised default process group as a :class:`World`, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size())
    return World()


def shares(selection: torch.Tensor, world: World) -> list[torch.Tensor]:
    """The contiguous parts of a global batch ``selection`` ``[b]`` taken by each process
    (sizes differ by at most one; a part may be empty)."""
    return list(selection.tensor_split(world.size))


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of ``tensor`` over the processes (a new tensor; ``tensor`` itself unchanged)."""
    if world.size == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_parts(part: torch.Tensor, sizes: list[int], world: World) -> torch.Tensor:
    """Concatenation, in rank order, of each process's ``part`` ``[sizes[rank], ...]``."""
    if world.size == 1:
        return part
    longest = max(sizes)
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[: part.shape[0]] = part
    gathered = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def reduce_error_sums(sums: ErrorSums, world: World) -> ErrorSums:
    """The :class:`~aenet_fn.core.loss.ErrorSums` of all processes added together."""
    if world.size == 1:
        return sums
    names = [field.name for field in attrs.fields(ErrorSums)]
    stacked = torch.stack([getattr(sums, name).to(torch.float64) for name in names])
    total = all_reduce_sum(stacked, world)
    return ErrorSums(**{name: total[k] for k, name in enumerate(names)})


def global_batch_loss(
    found: Residuals,
    supervised: torch.Tensor,
    n_labelled: torch.Tensor,
    stress_supervised: torch.Tensor | None,
    force_weight: float,
    unbiased: bool,
    stress_weight: float,
    world: World,
) -> torch.Tensor:
    """The loss of the global batch from this process's residuals ``found`` (of its share:
    ``supervised`` ``[n_r]`` atoms, ``n_labelled`` labelled atoms, ``stress_supervised``
    ``[b_r]`` structures or None). Its value is the global batch loss; its gradient is the
    contribution of this share, so that the sum of all processes' gradients is the global
    gradient."""
    errors, differences, stress = found.energy, found.forces, found.stress
    dtype = errors.dtype
    n_stresses = (
        torch.zeros((), dtype=dtype, device=errors.device)
        if stress_supervised is None
        else stress_supervised.sum().to(dtype)
    )
    local = torch.stack(
        [
            (errors * errors).sum(),
            (differences * differences).sum(),
            supervised.sum().to(dtype),
            n_labelled.to(dtype),
            torch.tensor(float(errors.shape[0]), dtype=dtype, device=errors.device),
            (stress * stress).sum(),
            n_stresses,
        ]
    )
    total = all_reduce_sum(local.detach(), world)
    sums = local + (total - local.detach())  # value: the global sums; gradient: this share's
    stress_terms = {}
    if stress_supervised is not None:
        stress_terms = {
            "stress_squared": sums[5],
            "n_stresses": sums[6],
            "stress_weight": stress_weight,
        }
    return loss_from_sums(
        sums[0], sums[4], sums[1], sums[2], sums[3], force_weight, unbiased, **stress_terms
    )


def agreed_seed(seed: int | None, world: World) -> int:
    """``seed``, or (when None) a fresh random seed; in a data-parallel run rank 0's value,
    broadcast so that every process draws the same split and plan."""
    value = torch.tensor(
        int(torch.Generator().seed() % 2**31) if seed is None else int(seed), dtype=torch.int64
    )
    if world.size > 1:
        dist.broadcast(value, src=0)
    return int(value)


def members_of(n_members: int, world: World) -> list[int]:
    """Indices of the committee members this process trains when members are spread over the
    processes (round robin: rank ``r`` takes ``r, r + size, ...``)."""
    return list(range(world.rank, n_members, world.size))


def all_gather_objects(values: list, world: World) -> list:
    """The concatenation, in rank order, of every process's list ``values`` (plain picklable
    records exchanged between the run's own processes)."""
    if world.size == 1:
        return list(values)
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, values)
    return [value for part in gathered for value in part]
