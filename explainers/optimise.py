"""Per-image optimisation, batched: the search that medxgan (latent inversion), gvr
(latent shift) and cia (mask) run for every image they explain.

Every image has its own variables, its own loss and its own stopping rule; the batch
is only a way to share the forward passes. Adam is element-wise, each image's loss
depends on its own variables only, and an image that has stopped is frozen and
leaves the forward pass, so an image's result does not depend on the rest of its
batch (tests check it).

An image stops at the first of:
- ``done``: the loss function says it has reached its goal (e.g. the decision
  flipped by the margin asked for), ``refine_steps`` steps after it first did;
- convergence: its loss improved by less than ``tolerance`` (relative) over the
  last ``patience`` steps, before it has reached its goal;
- the step budget ``steps``.

With ``refine_steps`` = 0 (the default) the search returns the first point that
reaches the goal, as the papers' searches do. With ``refine_steps`` > 0 it goes on
minimising the whole loss after the goal (the proximity or area term now has room
to act: Wachter et al. 2018, "Counterfactual explanations without opening the black
box", section 4) and returns, for each image that reached its goal, the visited point
of lowest loss among those that reached it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# loss_fn(variables of the active images, their indices in the batch)
#   -> (per-image loss (n,), per-image "goal reached" (n,) bool or None)
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class SearchBudget:
    steps: int = 100  # at most this many Adam steps per image
    learning_rate: float = 0.05
    tolerance: float = 1e-3  # relative loss improvement over `patience` steps below which an image stops
    patience: int = 10
    refine_steps: int = 0  # Adam steps an image goes on after first reaching its goal

    def __post_init__(self) -> None:
        if self.steps < 0 or self.refine_steps < 0:
            raise ValueError(f"step budget and refine_steps must be >= 0, got {self.steps}, {self.refine_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.learning_rate}")
        if self.tolerance < 0 or self.patience < 1:
            raise ValueError(f"tolerance must be >= 0 and patience >= 1, got {self.tolerance}, {self.patience}")


@dataclass
class SearchResult:
    variables: torch.Tensor  # (B, ...) the optimised variables (detached)
    steps_used: torch.Tensor  # (B,) int: Adam steps each image took
    loss: torch.Tensor  # (B,) the loss of the returned variables
    reached: torch.Tensor  # (B,) bool: the returned variables reach the goal


def per_image_adam(initial: torch.Tensor, loss_fn: LossFn, budget: SearchBudget) -> SearchResult:
    """Minimise each image's loss over its own slice of ``initial`` (B, ...) (see the
    module docstring for the stopping rules and what is returned)."""
    batch = initial.shape[0]
    variables = initial.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([variables], lr=budget.learning_rate)
    device = initial.device
    active = torch.ones(batch, dtype=torch.bool, device=device)
    steps_used = torch.zeros(batch, dtype=torch.long, device=device)
    reached = torch.zeros(batch, dtype=torch.bool, device=device)
    final_loss = torch.full((batch,), float("nan"), device=device, dtype=initial.dtype)
    # Refinement: the step each image first reached its goal, and its best point that reaches it.
    first_reached = torch.full((batch,), -1, dtype=torch.long, device=device)
    best = initial.detach().clone()
    best_loss = torch.full((batch,), float("inf"), device=device, dtype=initial.dtype)
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
            now = torch.zeros(batch, dtype=torch.bool, device=device)
            now[index] = done.reshape(-1).to(torch.bool)
            first_reached[now & (first_reached < 0)] = step
            # A NaN loss never replaces a finite best; a crossing point with NaN loss is kept
            # only while the image has no better one (so something that crossed is returned).
            improved = now & ((current < best_loss) | best_loss.isinf() | (best_loss.isnan() & ~current.isnan()))
            best[improved] = variables.detach()[improved]
            best_loss[improved] = current[improved]
            reached |= now
            stop |= reached & (step - first_reached >= budget.refine_steps)
        if len(history) > budget.patience:
            before = history[-1 - budget.patience]
            gain = (before - current) / before.abs().clamp_min(1e-8)
            # Not while refining: around the threshold the loss oscillates by design.
            stop |= active & ~reached & (gain < budget.tolerance)
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
    result = variables.detach().clone()
    result[reached] = best[reached]
    final_loss[reached] = best_loss[reached]
    return SearchResult(variables=result, steps_used=steps_used, loss=final_loss, reached=reached)


def crossing_loss(logit: torch.Tensor, wanted: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The searches' classification term and goal, per image.

    ``logit`` (n,): the classifier's logit minus logit(threshold); ``wanted`` (n,) 1.0 or
    0.0: the decision to reach; ``margin`` >= 0 logits. Returns (loss (n,), reached (n,)
    bool): BCE towards ``wanted`` of the logit shifted by the margin, and whether the
    logit has crossed the threshold by the margin. The loss is flat at ln 2 (its value at
    the crossing) beyond it: a crossed decision earns nothing more, so refinement after
    the goal (``SearchBudget.refine_steps``) only lowers the proximity or area terms;
    before the crossing it is the plain BCE.
    """
    sign = 2.0 * wanted - 1.0
    loss = F.binary_cross_entropy_with_logits(logit - margin * sign, wanted, reduction="none")
    return loss.clamp_min(math.log(2.0)), logit * sign >= margin


def counterfactual_loss(logit: torch.Tensor, wanted: torch.Tensor, margin: float, *,
                        penalty: torch.Tensor, cost: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The counterfactual searches' whole loss (medxgan's searched walk, gvr's shift, cia's
    mask), per image: ``crossing_loss`` + ``weight`` x mean over the elements of ``cost``
    x ``penalty``.

    ``logit``, ``wanted`` (n,) and ``margin`` as for ``crossing_loss``. ``penalty`` (n,
    ...): what the search should keep small, >= 0 (|change| at the generator's size for
    medxgan and gvr, the mask on its logit grid for cia); ``cost`` (n, ...), the same
    shape: the per-element weight
    (``explainers.lesions.outside_lung_weights``: ones, or higher outside the lungs);
    ``weight`` >= 0. The proximity term of Wachter et al. 2018 (section 4), weighted by
    place. Returns (loss (n,), reached (n,) bool) as ``crossing_loss``.
    """
    classification, reached = crossing_loss(logit, wanted, margin)
    return classification + weight * (penalty * cost).flatten(1).mean(dim=1), reached
