"""The 2-D sequence-parallel mesh: Ulysses groups inside, a ring across.

Sequence-parallel rank p = ring_rank * u + ulysses_rank: a Ulysses group is u consecutive
ranks (a node's NVLink domain when ranks are numbered node by node), a ring links the ranks
with the same Ulysses rank. Shard the sequence over all u * r ranks by p (`shard(...,
rank=mesh.sp_rank, world=mesh.world)`); the engine re-shards around the ring loop.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch.distributed as dist

from .comm import Group, group_rank_world
from .timeouts import group_timeout

_SUBGROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SPMesh:
    """One rank's view of the mesh: its two groups, sizes and coordinates."""
    ulysses_group: Group
    ring_group: Group
    u: int
    r: int
    u_rank: int
    r_rank: int

    @property
    def world(self) -> int:
        return self.u * self.r

    @property
    def sp_rank(self) -> int:
        return self.r_rank * self.u + self.u_rank


def _is_device_mesh(mesh: object) -> bool:
    return type(mesh).__name__ == "DeviceMesh" and hasattr(mesh, "get_group")


def mesh_groups(mesh: object) -> tuple[Group, Group]:
    """(ulysses group, ring group) of a user's mesh: a pair of process groups or a 2-D
    `DeviceMesh` whose dims are named "ulysses" and "ring"."""
    if _is_device_mesh(mesh):
        names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if sorted(names) != ["ring", "ulysses"]:
            raise ValueError(f"mesh: a DeviceMesh needs two dims named 'ulysses' and 'ring', "
                             f"got dims {names}")
        return mesh.get_group("ulysses"), mesh.get_group("ring")
    if (isinstance(mesh, tuple) and len(mesh) == 2 and all(
            isinstance(g, dist.ProcessGroup) for g in mesh)):
        return mesh
    raise TypeError(f"mesh must be a (ulysses_group, ring_group) pair of process groups or a "
                    f"DeviceMesh with dims 'ulysses' and 'ring', got {type(mesh).__name__}")


def sequence_rank(group: Group, mesh: object) -> tuple[SPMesh | None, int, int]:
    """(the mesh or None, sequence-parallel rank, world) of a call given `group` or `mesh`."""
    if mesh is None:
        return (None, *group_rank_world(group))
    if group is not None:
        raise ValueError("give either group or mesh, not both")
    sp = from_groups(*mesh_groups(mesh))
    return sp, sp.sp_rank, sp.world


def from_groups(ulysses_group: Group, ring_group: Group) -> SPMesh:
    (ur, u), (rr, r) = group_rank_world(ulysses_group), group_rank_world(ring_group)
    return SPMesh(ulysses_group, ring_group, u, r, ur, rr)


def split_group(group: Group, u: int) -> SPMesh:
    """The mesh of degree u over `group`: Ulysses groups of u consecutive group ranks, rings
    across them. Subgroups are created once per (group, u), by their members only."""
    rank, world = group_rank_world(group)
    if u == 1:
        return SPMesh(None, group, 1, world, 0, rank)
    g = group if group is not None else dist.group.WORLD
    cache = _SUBGROUPS.setdefault(g, {})
    if u not in cache:
        ranks = dist.get_process_group_ranks(g)
        j, i = divmod(rank, u)
        # use_local_synchronization: only the members create each group (names from ranks);
        # a ring of one rank still gets its own group (the loop needs a group of size 1)
        new = lambda members: dist.new_group(  # noqa: E731
            members, use_local_synchronization=True, timeout=group_timeout())
        ug = g if u == world else new(ranks[j * u:(j + 1) * u])
        rg = new(ranks[i::u])
        cache[u] = (ug, rg)
    ug, rg = cache[u]
    return SPMesh(ug, rg, u, world // u, rank % u, rank // u)
