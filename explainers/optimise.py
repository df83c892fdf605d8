"""Per-image optimisation, batched: the search that medxgan (latent inversion), gvr
(latent shift) and cia (mask) run for every image they explain.

Every image has its own variables, its own loss and its own stopping rule; the batch
is only a way to share the forward passes. Adam is element-wise, each image's loss
depends on its own variables only, and an image that has stopped is frozen and
leaves the forward pass, so an image's result does not depend on the rest of its
batch (tests check it).

An image stops at the first of:
- ``done``: the loss function says it has reached its goal (e.g. the decision
  flipped by the margin asked for);
- convergence: its loss improved by less than ``tolerance`` (relative) over the
  last ``patience`` steps;
- the step budget ``steps``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# loss_fn(variables of the active images, their indices in the batch)
#   -> (per-image loss (n,), per-image "goal reached" (n,) bool or None)
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class SearchBudget:
    steps: int = 100  # at most this many Adam steps per image
    learning_rate: float = 0.05
    tolerance: float = 1e-3  # relative loss improvement over `patience` steps below which an image stops
    patience: int = 10

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"step budget must be >= 0, got {self.steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.learning_rate}")
        if self.tolerance < 0 or self.patience < 1:
            raise ValueError(f"tolerance must be >= 0 and patience >= 1, got {self.tolerance}, {self.patience}")


@dataclass
class SearchResult:
    variables: torch.Tensor  # (B, ...) the optimised variables (detached)
    steps_used: torch.Tensor  # (B,) int: Adam steps each image took
    loss: torch.Tensor  # (B,) the loss of the returned variables
    reached: torch.Tensor  # (B,) bool: stopped because its goal was reached


def per_image_adam(initial: torch.Tensor, loss_fn: LossFn, budget: SearchBudget) -> SearchResult:
    """Minimise each image's loss over its own slice of ``initial`` (B, ...)."""
    batch = initial.shape[0]
    variables = initial.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([variables], lr=budget.learning_rate)
    device = initial.device
    active = torch.ones(batch, dtype=torch.bool, device=device)
    steps_used = torch.zeros(batch, dtype=torch.long, device=device)
    reached = torch.zeros(batch, dtype=torch.bool, device=device)
    final_loss = torch.full((batch,), float("nan"), device=device, dtype=initial.dtype)
    history: list[torch.Tensor] = []  # (B,) loss per step, NaN for frozen images

    for step in range(budget.steps + 1):
        index = active.nonzero().reshape(-1)
        if len(index) == 0:
            break
        loss, done = loss_fn(variables[index], index)
        loss = loss.reshape(-1)
        if loss.shape[0] != len(index):
            raise ValueError(f"loss_fn must return one loss per active image ({len(index)}), got {loss.shape[0]}")
        current = torch.full((batch,), float("nan"), device=device, dtype=initial.dtype)
        current[index] = loss.detach()
        final_loss[index] = loss.detach()
        history.append(current)
        stop = torch.zeros(batch, dtype=torch.bool, device=device)
        if done is not None:
            reached[index] = done.reshape(-1).to(torch.bool)
            stop |= reached
        if len(history) > budget.patience:
            before = history[-1 - budget.patience]
            gain = (before - current) / before.abs().clamp_min(1e-8)
            stop |= active & (gain < budget.tolerance)
        if step == budget.steps:
            break  # the budget is spent: the variables just evaluated are the result
        still = active & ~stop
        if not still.any():
            break
        frozen = variables.detach()[~still].clone()
        optimiser.zero_grad(set_to_none=True)
        # Only the images that go on contribute a gradient.
        keep = still[index]
        loss[keep].sum().backward()
        optimiser.step()
        with torch.no_grad():
            variables[~still] = frozen  # Adam's momentum must not move a stopped image
        active = still
        steps_used[still] += 1
    return SearchResult(variables=variables.detach(), steps_used=steps_used, loss=final_loss, reached=reached)
