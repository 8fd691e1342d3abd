"""Local training of the next-basket scorer: DP-SGD for the shared part, Ditto for the local one.

:func:`train_scorer` runs one merchant round: Opacus' Poisson sampling, per-record clipping in
one backward pass (client/clipped_gradients.py), Opacus' Gaussian noise from an explicit
generator and its RDP accountant, and a noise-only step for an empty Poisson batch.
:func:`personalise` fine-tunes a private copy of the shared weights on the merchant's own
records without DP (it is never sent), pulled towards the shared weights with strength ``prox``
(Ditto, Li et al. 2021).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.clipped_gradients import clipped_gradient_sum
from client.training import (
    DPSettings,
    LocalTraining,
    RoundResult,
    noise_only_step,
    steps_per_round,
)
from common.accounting import MechanismStep
from common.config import OptimizerKind
from common.errors import ConfigError
from common.nextbasket.model import BasketScorer, BasketSoftmaxLoss, RecordTensors, shared_arrays


def _optimizer(model: nn.Module, settings: LocalTraining) -> torch.optim.Optimizer:
    if settings.optimizer is OptimizerKind.SGD:
        return torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
    return torch.optim.Adam(
        model.parameters(), lr=settings.learning_rate, eps=settings.adam_epsilon
    )


def _loader(records: RecordTensors, batch_size: int, generator: torch.Generator) -> DataLoader:
    return DataLoader(
        TensorDataset(*records.tensors()), batch_size=batch_size, shuffle=True, generator=generator
    )


def train_scorer(
    *,
    model: BasketScorer,
    records: RecordTensors,
    settings: LocalTraining,
    dp: DPSettings | None,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> RoundResult:
    """Train ``model`` in place for one round; return the shared weights to release."""
    if len(records) == 0:
        raise ConfigError("no training records for this round")
    start = time.perf_counter()
    optimizer = _optimizer(model, settings)
    loader = _loader(records, settings.batch_size, sampling_generator)
    criterion = BasketSoftmaxLoss()
    mechanism = None
    accountant = None
    if dp is not None:
        q, steps = steps_per_round(len(records), settings)
        # Opacus' Poisson sampler (drawing from the loader's generator), its noise (the
        # optimiser's generator) and its RDP accountant, as PrivacyEngine.make_private with
        # ghost clipping wires them; the clipped sums come from one backward pass.
        loader = DPDataLoader.from_data_loader(loader)
        sample_rate = 1 / len(loader)
        optimizer = DPOptimizerFastGradientClipping(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clipping_norm,
            expected_batch_size=int(len(records) * sample_rate),
            loss_reduction="mean",
            generator=noise_generator,
        )
        accountant = RDPAccountant()
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        mechanism = MechanismStep(dp.noise_multiplier, q, steps)
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu else None
    losses = _epochs(model, optimizer, criterion, loader, settings, dp, noise_generator, anchor)
    if accountant is not None:
        used = accountant.history
        if len(used) != 1 or not math.isclose(used[0][1], q):
            raise RuntimeError(f"accountant history {used} differs from the planned {mechanism}")
    return RoundResult(
        arrays=shared_arrays(model),
        num_records=len(records),
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        mechanism=mechanism,
        seconds=time.perf_counter() - start,
    )


def _epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: BasketSoftmaxLoss,
    loader: DataLoader,
    settings: LocalTraining,
    dp: DPSettings | None,
    noise_generator: torch.Generator,
    anchor: list[torch.Tensor] | None,
) -> list[float]:
    """``anchor``: FedProx's proximal term ``mu/2 ||w - anchor||^2``, applied as its own step
    after each optimiser step. It depends on the weights only, never on a record, so it is
    post-processing of the DP step and costs no privacy."""
    model.train()
    device = next(model.parameters()).device
    losses: list[float] = []
    per_record = BasketSoftmaxLoss()
    per_record.reduction = "none"
    for _ in range(settings.local_epochs):
        for features, items, log_q, target in loader:
            if features.shape[0] == 0:
                if dp is not None:
                    noise_only_step(optimizer, dp, noise_generator)
                continue
            x, ids = features.to(device), items.to(device)
            log_q, target = log_q.to(device), target.to(device)
            optimizer.zero_grad(set_to_none=True)
            if dp is not None:
                step = clipped_gradient_sum(
                    model,
                    lambda m: per_record(m(x, ids), log_q, target),  # noqa: B023 - called here
                    max_grad_norm=dp.clipping_norm,
                )
                loss_value = float(step.losses.mean())
            else:
                loss = criterion(model(x, ids), log_q, target)
                loss.backward()
                loss_value = float(loss.item())
            optimizer.step()
            if anchor is not None:
                _proximal_pull(model, anchor, settings.learning_rate * settings.proximal_mu)
            losses.append(loss_value)
    return losses


def _proximal_pull(module: nn.Module, anchor: list[torch.Tensor], rate: float) -> None:
    with torch.no_grad():
        for param, start in zip(module.parameters(), anchor, strict=True):
            param.sub_(min(rate, 1.0) * (param - start))


def personalise(
    *,
    model: BasketScorer,
    records: RecordTensors,
    settings: LocalTraining,
    prox: float,
    generator: torch.Generator,
) -> dict[str, np.ndarray]:
    """Ditto: fine-tune ``model`` (a copy holding the shared weights) on local records with
    ``prox/2 * ||w - shared||^2`` added; returns the personal weights. No DP: they stay here."""
    if prox < 0:
        raise ConfigError(f"prox must be >= 0, got {prox}")
    anchor = [p.detach().clone() for p in model.parameters()]
    optimizer = _optimizer(model, settings)
    loader = _loader(records, settings.batch_size, generator)
    criterion = BasketSoftmaxLoss()
    device = next(model.parameters()).device
    model.train()
    for _ in range(settings.local_epochs):
        for features, items, log_q, target in loader:
            optimizer.zero_grad(set_to_none=True)
            logits = model(features.to(device), items.to(device))
            loss = criterion(logits, log_q.to(device), target.to(device))
            if prox > 0:
                pull = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * prox * pull
            loss.backward()
            optimizer.step()
    return shared_arrays(model)
