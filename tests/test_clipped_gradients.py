"""One-pass per-record clipping equals per-record autograd and Opacus' two-pass ghost clipping."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.clipped_gradients import clipped_gradient_sum
from common.nextbasket.model import BasketScorer, BasketSoftmaxLoss
from common.nextbasket.records import NEGATIVE, POSITIVE
from common.nextbasket.spec import ScorerSpec

SPEC = ScorerSpec(product_buckets=40, category_buckets=12, department_buckets=6, hidden_dim=8)
RECORDS, CANDIDATES = 6, 10


def batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Records whose candidates repeat ids within a record (the embedding sums must add up)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(RECORDS, CANDIDATES, SPEC.features, generator=g)
    features[..., 0] = (torch.rand(RECORDS, CANDIDATES, generator=g) < 0.5).float()
    items = torch.stack(
        [
            torch.randint(1, 6, (RECORDS, CANDIDATES), generator=g),  # few ids: repeats
            torch.randint(1, SPEC.category_buckets, (RECORDS, CANDIDATES), generator=g),
            torch.randint(1, SPEC.department_buckets, (RECORDS, CANDIDATES), generator=g),
        ],
        dim=-1,
    )
    log_q = torch.zeros(RECORDS, 1, CANDIDATES)
    target = torch.full((RECORDS, 1, CANDIDATES), NEGATIVE)
    target[:, 0, :2] = POSITIVE
    return features, items, log_q, target


def scorer(seed: int = 1) -> BasketScorer:
    torch.manual_seed(seed)
    model = BasketScorer(SPEC)
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.7)
    return model


def per_record_losses(model: nn.Module, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    features, items, log_q, target = data
    loss = BasketSoftmaxLoss()
    loss.reduction = "none"
    return loss(model(features, items), log_q, target)


def grads(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.5, 1e6])  # all, some, none clipped
def test_clipped_sum_equals_clipping_each_record_gradient_separately(max_grad_norm) -> None:
    data = batch()
    model = scorer()
    step = clipped_gradient_sum(
        model, lambda m: per_record_losses(m, data), max_grad_norm=max_grad_norm
    )
    fast = grads(model)

    expected = {n: np.zeros_like(v) for n, v in fast.items()}
    norms = []
    for i in range(RECORDS):
        model.zero_grad(set_to_none=True)
        one = tuple(t[i : i + 1] for t in data)
        per_record_losses(model, one).sum().backward()
        g = grads(model)
        norm = float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values())))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (norm + 1e-6))
        for n in expected:
            expected[n] += factor * g[n]
    np.testing.assert_allclose(step.norms.numpy(), norms, rtol=1e-5)
    for n in fast:
        np.testing.assert_allclose(fast[n], expected[n], rtol=1e-4, atol=1e-6, err_msg=n)
    if max_grad_norm == 1e-3:  # every record clipped: the sum's norm is at most records * C
        total = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in fast.values()))
        assert total <= RECORDS * max_grad_norm * (1 + 1e-5)


def test_clipped_sum_equals_opacus_two_pass_ghost_clipping() -> None:
    data = batch(seed=4)
    model = scorer(seed=5)
    reference = scorer(seed=5)
    clipped_gradient_sum(model, lambda m: per_record_losses(m, data), max_grad_norm=0.3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        module, optimizer, criterion, _ = engine.make_private(
            module=reference,
            optimizer=torch.optim.SGD(reference.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(*data), batch_size=RECORDS),
            criterion=BasketSoftmaxLoss(),
            noise_multiplier=1.0,
            max_grad_norm=0.3,
            grad_sample_mode="ghost",
            poisson_sampling=False,
        )
        features, items, log_q, target = data
        optimizer.zero_grad()
        criterion(module(features, items), log_q, target).backward()  # both passes, no noise
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        np.testing.assert_allclose(
            p.grad.numpy(), q.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name
        )


def test_models_outside_its_contract_are_refused() -> None:
    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.norm = nn.LayerNorm(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.linear(x))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.linear(x))

    x = torch.randn(4, 1, 3)
    with pytest.raises(TypeError, match=r"norm\.weight"):
        clipped_gradient_sum(Normed(), lambda m: m(x).sum((1, 2)), max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="exactly once"):
        clipped_gradient_sum(Twice(), lambda m: m(x[..., :2]).sum((1, 2)), max_grad_norm=1.0)
