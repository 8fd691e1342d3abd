"""Per-record clipped gradient sums in one backward pass, for DP-SGD on the next-basket scorer.

DP-SGD needs ``sum_i clip(grad L_i)`` over the records ``i`` of a Poisson batch, where
``clip(g) = g * min(1, C / (||g|| + 1e-6))`` (Opacus' factor). Opacus' ghost clipping gets it
with two backward passes: one for the per-record norms, a second for the gradient of
``sum_i c_i L_i``. For a model whose weights all sit in ``nn.Embedding`` and ``nn.Linear``
layers, each called once per forward on ``[records, ...]`` inputs, both the norms and the
clipped sum follow from what one backward pass already has at every layer: its input ``a``
and the gradient ``g`` of ``sum_i L_i`` at its output (record ``i``'s rows of ``g`` depend on
``L_i`` only, because records do not interact in the forward pass). Per record, a Linear
layer's weight gradient is ``g_i^T a_i`` and an embedding's is ``g_i`` summed per looked-up
row; so

    norm_i^2 = sum over layers of ||layer gradient of record i||^2
    clipped sum = sum over records of c_i * layer gradient of record i, per layer.

This is "book-keeping" clipping (Bu et al., 2023): the same clipped sum as the two-pass method
at about the cost of one non-private step plus the per-layer sums.
tests/test_clipped_gradients.py checks it against per-record autograd and against Opacus'
two-pass ghost clipping. Noise, sampling and accounting stay Opacus'
(client/nextbasket_training.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

_OPACUS_EPSILON = 1e-6  # the stabiliser of Opacus' clipping factor, C / (norm + 1e-6)


@dataclass(frozen=True)
class ClippedStep:
    """What one batch produced: per-record losses and gradient norms (before clipping)."""

    losses: torch.Tensor  # [records]
    norms: torch.Tensor  # [records]


class _Tape:
    """Records each Embedding/Linear call of one forward pass: (module, input, output)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.Embedding | nn.Linear)]
        covered = {id(p) for m in self.layers for p in m.parameters(recurse=False)}
        others = [
            n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered
        ]
        if others:
            raise TypeError(f"one-pass clipping covers Embedding/Linear weights only: {others}")
        for m in self.layers:
            if isinstance(m, nn.Embedding) and (m.padding_idx is not None or m.max_norm):
                raise TypeError(
                    "one-pass clipping needs plain embeddings (no padding_idx, max_norm)"
                )
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> _Tape:
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _record(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        self.calls.append((module, inputs[0], output))


def clipped_gradient_sum(
    model: nn.Module,
    loss_per_record: Callable[[nn.Module], torch.Tensor],
    *,
    max_grad_norm: float,
) -> ClippedStep:
    """Set every weight's ``.grad`` to the sum over records of its clipped per-record gradient.

    ``loss_per_record(model)`` runs the forward pass and returns ``[records]`` losses; records
    are the first dimension of every layer input. ``.grad`` is replaced, not accumulated.
    """
    tape = _Tape(model)
    with tape:
        losses = loss_per_record(model)
    records = losses.shape[0]
    modules = [m for m, _, _ in tape.calls]
    if len({id(m) for m in modules}) != len(modules) or len(modules) != len(tape.layers):
        raise RuntimeError(
            "one-pass clipping needs each Embedding/Linear layer called exactly once"
        )
    outputs = [out for _, _, out in tape.calls]
    grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)

    per_layer = []
    squared = torch.zeros(records, dtype=losses.dtype, device=losses.device)
    for (module, a, out), g in zip(tape.calls, grads, strict=True):
        g = torch.zeros_like(out) if g is None else g.detach()
        parts = _per_record(module, a.detach(), g, records)
        for _, part_squared in parts:
            squared += part_squared
        per_layer.append((module, a.detach(), g, parts))
    norms = squared.sqrt()
    coef = (max_grad_norm / (norms + _OPACUS_EPSILON)).clamp(max=1.0)
    for module, a, g, parts in per_layer:
        _write_clipped(module, a, g, parts, coef)
    return ClippedStep(losses=losses.detach(), norms=norms)


def _per_record(
    module: nn.Module, a: torch.Tensor, g: torch.Tensor, records: int
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """Per-record (gradient or None, squared norm) of each of the layer's weights."""
    if isinstance(module, nn.Linear):
        a3 = a.reshape(records, -1, a.shape[-1]).to(g.dtype)
        g3 = g.reshape(records, -1, g.shape[-1])
        weight = torch.bmm(g3.transpose(1, 2), a3)  # [records, out, in]
        parts: list[tuple[torch.Tensor | None, torch.Tensor]] = [
            (weight, weight.pow(2).flatten(1).sum(1))
        ]
        if module.bias is not None:
            bias = g3.sum(1)
            parts.append((bias, bias.pow(2).sum(1)))
        return parts
    assert isinstance(module, nn.Embedding)
    ids = a.reshape(records, -1)
    lookups = ids.shape[1]
    rows = g.reshape(records * lookups, -1)
    owner = torch.arange(records, device=ids.device).repeat_interleave(lookups)
    keys, inverse = torch.unique(
        owner * module.num_embeddings + ids.reshape(-1), return_inverse=True
    )
    summed = torch.zeros(len(keys), rows.shape[1], dtype=rows.dtype, device=rows.device)
    summed.index_add_(0, inverse, rows)
    squared = torch.zeros(records, dtype=rows.dtype, device=rows.device)
    squared.scatter_add_(0, keys // module.num_embeddings, summed.pow(2).sum(1))
    return [(None, squared)]


def _write_clipped(
    module: nn.Module,
    a: torch.Tensor,
    g: torch.Tensor,
    parts: list[tuple[torch.Tensor | None, torch.Tensor]],
    coef: torch.Tensor,
) -> None:
    if isinstance(module, nn.Linear):
        weight = parts[0][0]
        assert weight is not None
        module.weight.grad = torch.einsum("r,roi->oi", coef.to(weight.dtype), weight).to(
            module.weight.dtype
        )
        if module.bias is not None:
            bias = parts[1][0]
            assert bias is not None
            module.bias.grad = (coef.to(bias.dtype)[:, None] * bias).sum(0).to(module.bias.dtype)
        return
    assert isinstance(module, nn.Embedding)
    records = coef.shape[0]
    ids = a.reshape(-1)
    scaled = (g.reshape(records, -1, g.shape[-1]) * coef.to(g.dtype)[:, None, None]).reshape(
        -1, g.shape[-1]
    )
    grad = torch.zeros_like(module.weight)
    grad.index_add_(0, ids, scaled.to(grad.dtype))
    module.weight.grad = grad
