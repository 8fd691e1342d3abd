"""Local training of one merchant round: DP-SGD with Opacus (or non-private, for baselines).

DP mode uses Poisson sampling, ghost clipping (per-record gradient norms without per-sample
gradients of the embedding tables) and Gaussian noise from an explicit generator. A record is
one event or one customer (``PrivacyUnit``); its loss is the mean over the events it holds, so
a customer's whole contribution is clipped as one unit.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.accounting import MechanismStep
from common.config import OptimizerKind
from common.errors import ConfigError, TrainingError
from common.features import RecordTensors
from common.model import Recommender, load_state_arrays, state_arrays

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSettings:
    """The mechanism of one round. ``noise_multiplier`` 0 is allowed only for audits' controls."""

    noise_multiplier: float
    clipping_norm: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not (self.clipping_norm > 0 and math.isfinite(self.clipping_norm)):
            raise ConfigError(f"clipping_norm must be > 0, got {self.clipping_norm!r}")


@dataclass(frozen=True)
class LocalTraining:
    """Optimisation settings of one local round."""

    batch_size: int = 512
    local_epochs: int = 1
    learning_rate: float = 3e-3
    proximal_mu: float = 0.0
    optimizer: OptimizerKind = OptimizerKind.ADAM
    momentum: float = 0.9
    adam_epsilon: float = 1e-8

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.local_epochs < 1:
            raise ConfigError("batch_size and local_epochs must be >= 1")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu!r}")


@dataclass(frozen=True)
class RoundResult:
    arrays: dict[str, np.ndarray]
    num_records: int
    mean_loss: float
    mechanism: MechanismStep | None  # None for non-private training
    seconds: float


class GroupedSoftmaxLoss(nn.Module):
    """Sampled-softmax loss, averaged over the valid events of each record.

    Carries ``reduction`` because Opacus' ghost-clipping wrapper switches it to ``"none"`` to
    obtain one loss per record.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_event = -torch.log_softmax(logits, dim=-1)[..., 0]  # positive is candidate 0
        per_record = (per_event * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.reduction == "none":
            return per_record
        return per_record.sum() if self.reduction == "sum" else per_record.mean()


def steps_per_round(num_records: int, settings: LocalTraining) -> tuple[float, int]:
    """(sample rate q, steps) exactly as Opacus will use them: q = 1/len(loader)."""
    batches = math.ceil(num_records / settings.batch_size)
    return 1.0 / batches, batches * settings.local_epochs


def _prepare(
    model: Recommender, records: RecordTensors, settings: LocalTraining, generator: torch.Generator
) -> tuple[DataLoader, torch.optim.Optimizer]:
    loader = DataLoader(
        TensorDataset(*records.tensors()),
        batch_size=settings.batch_size,
        shuffle=True,
        generator=generator,
    )
    optimizer: torch.optim.Optimizer
    if settings.optimizer is OptimizerKind.SGD:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
    else:
        optimizer = torch.optim.Adam(
            model.parameters(), lr=settings.learning_rate, eps=settings.adam_epsilon
        )
    return loader, optimizer


def _proximal_pull(
    model: nn.Module, anchor: dict[str, torch.Tensor], *, mu: float, lr: float
) -> None:
    """FedProx's pull towards the global model, applied after the (noised) step: it uses no
    data, so it is post-processing and costs no privacy."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            ref = anchor[name.removeprefix("_module.")]
            param.sub_(lr * mu * (param - ref))


def train_round(
    *,
    model: Recommender,
    records: RecordTensors,
    settings: LocalTraining,
    dp: DPSettings | None,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> RoundResult:
    """Train ``model`` in place for one round and return the weights to release."""
    if len(records) == 0:
        raise ConfigError("no training records for this round")
    start = time.perf_counter()
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    loader, optimizer = _prepare(model, records, settings, sampling_generator)
    criterion: nn.Module | object = GroupedSoftmaxLoss()
    mechanism = None
    train_module: nn.Module = model
    if dp is not None:
        q, steps = steps_per_round(len(records), settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            train_module, optimizer, criterion, loader = engine.make_private(
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
    train_module.train()
    with warnings.catch_warnings():
        # Ghost clipping's second backward pass runs with hooks on outputs only; harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        losses = _run_epochs(
            train_module, optimizer, criterion, loader, settings, dp, noise_generator, anchor
        )
    if dp is not None:
        used = engine.accountant.history
        sigma_used, q_used, _steps = used[0] if used else (dp.noise_multiplier, 0.0, 0)
        assert mechanism is not None
        if len(used) != 1 or not math.isclose(q_used, mechanism.sample_rate):
            raise TrainingError(f"accountant history {used} differs from the planned {mechanism}")
        # Empty Poisson batches are noised by hand (below), so count the planned steps.
        mechanism = MechanismStep(sigma_used, q_used, mechanism.steps)
        train_module = train_module._module  # type: ignore[assignment]
    arrays = state_arrays(model)
    return RoundResult(
        arrays=arrays,
        num_records=len(records),
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        mechanism=mechanism,
        seconds=time.perf_counter() - start,
    )


def _noise_only_step(
    optimizer: torch.optim.Optimizer, dp: DPSettings, generator: torch.Generator
) -> None:
    """An empty Poisson batch still takes a noised step: skipping it would reveal the emptiness."""
    inner = getattr(optimizer, "original_optimizer", optimizer)
    expected = getattr(optimizer, "expected_batch_size", 1) or 1
    for group in inner.param_groups:
        for param in group["params"]:
            noise = torch.normal(
                0.0,
                dp.noise_multiplier * dp.clipping_norm,
                param.shape,
                generator=generator,
                device=param.device,
            )
            param.grad = noise / expected
    inner.step()
    inner.zero_grad(set_to_none=True)


def _run_epochs(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: object,
    loader: DataLoader,
    settings: LocalTraining,
    dp: DPSettings | None,
    noise_generator: torch.Generator,
    anchor: dict[str, torch.Tensor],
) -> list[float]:
    losses: list[float] = []
    device = next(module.parameters()).device
    for _ in range(settings.local_epochs):
        for history, items, categories, departments, mask in loader:
            if history.shape[0] == 0:
                if dp is not None:
                    _noise_only_step(optimizer, dp, noise_generator)
                continue
            optimizer.zero_grad(set_to_none=True)
            logits = module(
                history.to(device), items.to(device), categories.to(device), departments.to(device)
            )
            loss = criterion(logits, mask.to(device))  # type: ignore[operator]
            loss.backward()
            optimizer.step()
            if settings.proximal_mu > 0:
                _proximal_pull(module, anchor, mu=settings.proximal_mu, lr=settings.learning_rate)
            losses.append(float(loss.item()))
    return losses


def new_model_from(arrays: dict[str, np.ndarray] | None, model: Recommender) -> Recommender:
    if arrays is not None:
        load_state_arrays(model, arrays)
    return model
