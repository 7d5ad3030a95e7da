"""The device's half of a gradient-aligned shared A: a sketch of its gradient, not the gradient.

For every adapted Linear ``W`` (out x in) the coordinator wants the top right singular
vectors of the cohort's summed gradient ``G = dL/dW`` at the bare base
(protocols/shared_a.py). A device sends ``G^T Omega`` for the cohort's public sign
matrices ``Omega``, never G, and SecAgg+ sums it with the others.

It costs no new machinery: with the adapter's A at zero and its B set to ``Omega``, the
adapter adds nothing to the forward pass (the loss is the base's) and the gradient of A
is ``scale * Omega^T G``, through the very forward the device trains with (lean int8/bf16
or the model's own). So a pass is one backward per batch; ``passes`` sign matrices give
``passes x rank`` columns per module.
"""

from __future__ import annotations

import numpy as np
import torch

from lorafleet.client.adapter import adapter_layers, get_a, get_b, load_a, set_b
from lorafleet.client.data import TokenBlocks
from lorafleet.client.train import LocalTrainer, TrainConfig, cycle_batches
from lorafleet.protocols.errors import DataError
from lorafleet.protocols.shared_a import ATensors, normalize_sketch, sketch_signs
from lorafleet.protocols.spec import AdapterSpec


def gradient_sketch(
    model: torch.nn.Module,
    spec: AdapterSpec,
    blocks: TokenBlocks,
    *,
    passes: int,
    batches: int,
    batch_size: int,
    precision: str = "auto",
    device: str = "auto",
    seed: int = 0,
) -> ATensors:
    """The device's normalized sketch ``G^T Omega``, ``(in, passes x rank)`` per module.

    ``G`` is summed over ``batches`` shuffled training batches (the same ones for every
    pass). The model's A and B are put back afterwards, frozen A included.
    """
    if len(blocks) == 0:
        raise DataError("no training text for a gradient sketch")
    layers = adapter_layers(model)
    saved_a, saved_b = get_a(model), get_b(model)
    signs = [
        {p: sketch_signs(spec, p, int(b.weight.shape[0]), j) for p, (_, b) in layers.items()}
        for j in range(passes)
    ]
    zeros = {p: np.zeros(tuple(a.weight.shape), np.float32) for p, (a, _) in layers.items()}
    trainer = LocalTrainer(
        model,
        TrainConfig(
            steps=1,
            lr=1e-3,
            a_lr=1e-3,  # only so that A's gradient is computed; nothing steps
            batch_size=batch_size,
            warmup_steps=0,
            precision=precision,  # type: ignore[arg-type]
            device=device,
            seed=seed,
        ),
    )
    order = cycle_batches(blocks, batch_size, torch.Generator().manual_seed(seed))
    chosen = [next(order) for _ in range(batches)]
    columns: dict[str, list[np.ndarray]] = {p: [] for p in layers}
    try:
        for omega in signs:
            set_b(model, omega)
            load_a(model, zeros)
            trainer.optimizer.zero_grad(set_to_none=True)
            for batch in chosen:
                trainer.backward(batch)
            for path, (a, _) in layers.items():
                grad = a.weight.grad
                if grad is None:
                    raise DataError(f"no gradient reached the adapter of {path}")
                columns[path].append(grad.detach().to(torch.float32).cpu().numpy().T)
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.freeze_a()
        set_b(model, saved_b)
        load_a(model, saved_a)
    return normalize_sketch({p: np.concatenate(c, axis=1) for p, c in columns.items()})
