"""The collectives a sharded step issues, and a program that issues only them.

A decode step's floor is the bytes its devices read over the memory bandwidth plus the time of
its collectives, which no schedule here overlaps with compute (each one waits on the layer's
arithmetic before it and the next waits on it). `step_collectives` reads them off the
shard_map of the model's step (`sharding.forward`), with the shapes and axes the step gives
them and how many times each runs (a layer scan's body counts once per layer); those the
compiler adds outside it (the sampler's on logits split over tp: a few values a row) are not
counted. `collectives_only` builds the program that runs them and nothing else, each after the
one before (a kind's repetitions back to back, not interleaved as in the step: the same
collectives in another order), so that timing it measures the communication alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

COLLECTIVE_PRIMITIVES = frozenset({"psum", "psum_invariant", "pmax", "pmin", "all_gather", "all_gather_invariant",
                                   "reduce_scatter", "all_to_all", "ragged_all_to_all", "ppermute"})


# Equal collectives on equal operands would be merged (CSE) and neighbours of a kind combined
# into one: the step runs them apart, and so must the replay.
KEEP_EVERY_COLLECTIVE = {"xla_disable_hlo_passes": ",".join(
    f"{prefix}{kind}-combiner" for prefix in ("", "gpu-", "cpu-") for kind in ("all-gather", "all-reduce", "reduce-scatter")
) + ",cse"}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a step as one device issues it: its operands' per-device shapes."""
    primitive: Any
    params: dict
    operands: tuple[jax.ShapeDtypeStruct, ...]
    count: int

    @property
    def name(self) -> str:
        return self.primitive.name

    @property
    def operand_bytes(self) -> int:
        return sum(int(np.prod(o.shape)) * np.dtype(o.dtype).itemsize for o in self.operands)

    def describe(self) -> str:
        axes = self.params.get("axes", self.params.get("axis_name"))
        shapes = ", ".join(f"{np.dtype(o.dtype).name}{list(o.shape)}" for o in self.operands)
        return f"{self.count} x {self.name}({shapes}) over {axes}"


def step_collectives(fn: Callable, *args, **kwargs) -> tuple[Mesh, list[Collective]]:
    """The mesh and the collectives of the shard_map inside fn(*args): one entry per distinct
    collective (primitive, parameters, operand shapes), counted over loops. Of a conditional's
    branches the one moving the most bytes counts (every branch of a step issues the same
    collectives, or devices taking different ones would hang)."""
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
    maps = [eqn for eqn in _walk(jaxpr) if eqn.primitive.name == "shard_map"]
    if len(maps) != 1:
        raise ValueError(f"expected one shard_map in the step, found {len(maps)}")
    found: dict[tuple, Collective] = {}
    for collective in _collectives(maps[0].params["jaxpr"], 1):
        key = (collective.name, repr(sorted(collective.params.items())), collective.operands)
        if key in found:
            collective = dataclasses.replace(collective, count=found[key].count + collective.count)
        found[key] = collective
    return maps[0].params["mesh"], list(found.values())


def _walk(jaxpr) -> Iterator:
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name != "shard_map":
            for sub in _sub_jaxprs(eqn):
                yield from _walk(sub)


def _sub_jaxprs(eqn) -> list:
    subs = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, ClosedJaxpr):
                subs.append(item.jaxpr)
            elif isinstance(item, Jaxpr):
                subs.append(item)
    return subs


def _collectives(jaxpr, times: int) -> list[Collective]:
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in COLLECTIVE_PRIMITIVES:
            operands = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
            found.append(Collective(eqn.primitive, dict(eqn.params), operands, times))
        elif name == "cond":
            branches = [_collectives(b.jaxpr, times) for b in eqn.params["branches"]]
            found.extend(max(branches, key=lambda cs: sum(c.operand_bytes * c.count for c in cs)))
        else:
            repeat = eqn.params["length"] if name == "scan" else 1
            inner = [c for sub in _sub_jaxprs(eqn) for c in _collectives(sub, times * repeat)]
            if inner and name == "while":
                raise ValueError(f"collectives inside a while loop, whose trips are unknown: "
                                 f"{', '.join(c.describe() for c in inner)}")
            found.extend(inner)
    return found


def collectives_only(mesh: Mesh, collectives: list[Collective]) -> tuple[Callable[..., list], list[jax.Array]]:
    """A jitted program running each collective its count of times, each after the one before,
    on zeros of its operands' shapes (giving back every result), and the inputs to call it with."""
    axes = tuple(mesh.axis_names)
    shapes = sorted({o for c in collectives for o in c.operands}, key=repr)
    index = {s: i for i, s in enumerate(shapes)}
    sharding = NamedSharding(mesh, P(axes))
    inputs = [jax.device_put(np.zeros((mesh.size, *s.shape), s.dtype), sharding) for s in shapes]

    def body(*stacked):
        # each collective's operands pass a barrier with the result of the one before, so it
        # starts once that one is done; every result is returned, or XLA would drop all but
        # the last collective (the barriers' other outputs unused) and merge equal ones
        local = [x[0] for x in stacked]
        results: list[jax.Array] = []
        for c in collectives:
            for _ in range(c.count):
                operands, _ = jax.lax.optimization_barrier(([local[index[o]] for o in c.operands], results[-1:]))
                results.extend(jax.tree.leaves(c.primitive.bind(*operands, **c.params)))
        return [r[None] for r in results]

    program = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(axes),) * len(inputs), out_specs=P(axes),
                                    check_vma=False))
    return program.lower(*inputs).compile(KEEP_EVERY_COLLECTIVE), inputs
