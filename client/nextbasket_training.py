"""Local training of the next-basket scorer: DP-SGD for the shared part, Ditto for the local one.

:func:`train_scorer` runs one merchant round: Poisson sampling, ghost clipping (per-record
gradient norms without per-sample gradients of the embedding tables), Gaussian noise from an
explicit generator, and a noise-only step for an empty Poisson batch. :func:`personalise`
fine-tunes a private copy of the shared weights on the merchant's own records without DP (it
is never sent), pulled towards the shared weights with strength ``prox`` (Ditto, Li et al.
2021).
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
    criterion: nn.Module | object = BasketSoftmaxLoss()
    module: nn.Module = model
    mechanism = None
    if dp is not None:
        q, steps = steps_per_round(len(records), settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            module, optimizer, criterion, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                criterion=criterion,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.clipping_norm,
                grad_sample_mode="ghost",
                poisson_sampling=True,
                noise_generator=noise_generator,
            )
        mechanism = MechanismStep(dp.noise_multiplier, q, steps)
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu else None
    losses = _epochs(module, optimizer, criterion, loader, settings, dp, noise_generator, anchor)
    if dp is not None:
        used = engine.accountant.history
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
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: object,
    loader: DataLoader,
    settings: LocalTraining,
    dp: DPSettings | None,
    noise_generator: torch.Generator,
    anchor: list[torch.Tensor] | None,
) -> list[float]:
    """``anchor``: FedProx's proximal term ``mu/2 ||w - anchor||^2``, applied as its own step
    after each optimiser step. It depends on the weights only, never on a record, so it is
    post-processing of the DP step and costs no privacy."""
    module.train()
    device = next(module.parameters()).device
    losses: list[float] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(settings.local_epochs):
            for features, items, log_q, target in loader:
                if features.shape[0] == 0:
                    if dp is not None:
                        noise_only_step(optimizer, dp, noise_generator)
                    continue
                optimizer.zero_grad(set_to_none=True)
                logits = module(features.to(device), items.to(device))
                loss = criterion(logits, log_q.to(device), target.to(device))  # type: ignore[operator]
                loss.backward()
                optimizer.step()
                if anchor is not None:
                    _proximal_pull(module, anchor, settings.learning_rate * settings.proximal_mu)
                losses.append(float(loss.item()))
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
