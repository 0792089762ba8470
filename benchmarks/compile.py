"""What ``torch.compile`` (inductor) gains on the ``torch.func`` route: one MD step's energy,
forces and stress, and one force-training step, each against eager calls of the same function.

Run: ``python -m benchmarks.compile [--steps 40] [--vectorize]``. Prints JSON, then a table.
CPU, float64, 2 threads. Prediction: the published TiO2 potential on rutile (46 atoms), the
positions jittered every step so that the neighbour graph (built eagerly) changes size as in
MD. Training: the common TiO2 benchmark descriptor and networks, batches of 16 drawn at
random, forces weighted 0.1, ``route="func"``. Both compile with ``dynamic=True``. Eager and
compiled calls alternate on the same inputs; the first compiled call's time is the compile.
Inductor's C++ vectorisation is off unless ``--vectorize``: with it on, the code generation of
the descriptor's gathers did not finish in 15 minutes on this CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch

import aenet_fn as af
from aenet_fn.core.batch import collate
from aenet_fn.core.descriptor import build_graph
from aenet_fn.driver.loader import take_batch
from aenet_fn.examples import TIO2_POTENTIAL, TIO2_STRUCTURES
from benchmarks._common import (
    ARCH,
    BATCH_SIZE,
    FORCE_WEIGHT,
    PARAMS,
    parse_benchmark_arguments,
    report,
    setup_info,
    tio2_structures,
)


def _prediction_calls(steps: int) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
    """The MD step's function and its inputs at ``steps`` jittered rutile configurations."""
    model = af.read_aenet_ascii(TIO2_POTENTIAL)
    rutile = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[1])[0]
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(steps):
        batch = collate([rutile], species=model.descriptor.species)
        jitter = 0.05 * torch.randn(batch.positions.shape, generator=generator, dtype=torch.float64)
        batch = attrs.evolve(batch, positions=batch.positions + jitter)
        inputs.append((model, batch, build_graph(model.descriptor, batch)))

    def md_step(model: af.Model, batch: Any, graph: Any) -> Any:
        return af.energy_forces_stress(model, batch, graph, compute_stress=True)

    return md_step, inputs


def _training_calls(steps: int) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
    """``train_step`` and its inputs: one state, ``steps`` random force batches."""
    structures = tio2_structures()
    train = af.featurize_structures(PARAMS, structures, with_derivatives=True)
    model = af.init_model(PARAMS, ARCH, train, seed=1)
    config = af.TrainConfig(batch_size=BATCH_SIZE, force_weight=FORCE_WEIGHT, route="func")
    state = af.init_train_state(model, train, config)
    generator = torch.Generator().manual_seed(0)
    everyone = torch.ones(len(structures), dtype=torch.bool)
    inputs = [
        (
            state,
            take_batch(train, torch.randperm(len(structures), generator=generator)[:16], everyone),
            config,
        )
        for _ in range(steps)
    ]
    return af.train_step, inputs


def _row(case: str, function: Callable[..., Any], inputs: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Compile time, eager and compiled ms per call (medians, alternating), break-even calls."""
    torch._dynamo.reset()
    compiled = torch.compile(function, dynamic=True)
    start = time.perf_counter()
    compiled(*inputs[0])
    compile_s = time.perf_counter() - start
    eager_ms, compiled_ms = [], []
    for arguments in inputs[1:]:
        for variant, times in ((function, eager_ms), (compiled, compiled_ms)):
            begin = time.perf_counter()
            variant(*arguments)
            times.append(1e3 * (time.perf_counter() - begin))
    eager, fast = statistics.median(eager_ms), statistics.median(compiled_ms)
    gain = eager - fast
    return {
        "case": case,
        "compile_s": round(compile_s, 1),
        "eager_ms": round(eager, 2),
        "compiled_ms": round(fast, 2),
        "speedup": round(eager / fast, 2),
        "slowest_compiled_ms": round(max(compiled_ms), 1),
        "break_even_calls": round(1e3 * compile_s / gain) if gain > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vectorize", action="store_true", help="inductor's C++ SIMD on")
    args = parse_benchmark_arguments(parser)
    if not args.vectorize:
        torch._inductor.config.cpp.simdlen = 1
    rows = [
        _row("MD step, 46 atoms", *_prediction_calls(args.steps)),
        _row("force training step, 16 structures", *_training_calls(args.steps)),
    ]
    info = setup_info(dtype="float64", device="cpu", vectorize=args.vectorize, steps=args.steps)
    report("compile", info, rows)


if __name__ == "__main__":
    main()
