"""explainers.optimise.per_image_adam: the stopping rules and the refinement after the goal."""
import pytest
import torch
import torch.nn.functional as F

from explainers.optimise import SearchBudget, per_image_adam

# Per image: reach x >= 1 (the "decision crossed"), with a cost that prefers small x.
# The loss's minimum lies above the goal for image 0 (x ~ 1.5) and below it for image 1
# (x ~ 0.6), so the best point that reaches the goal is x* for image 0 and the lowest
# crossing point for image 1.
PULL = torch.tensor([1.0, 0.1])


def loss_fn(x: torch.Tensor, index: torch.Tensor):
    value = x[:, 0]
    loss = F.softplus(4.0 * (1.2 - value)) * PULL[index] * 4 + 0.5 * value ** 2
    return loss, value >= 1.0


def _search(refine_steps: int, batch: slice = slice(None)):
    start = torch.zeros(2, 1)[batch]

    def fn(x, index):
        return loss_fn(x, torch.arange(2)[batch][index])

    return per_image_adam(start, fn, SearchBudget(steps=400, learning_rate=0.05, tolerance=0.0, patience=401,
                                                  refine_steps=refine_steps))


def _recorded_search(refine_steps: int, *, tolerance: float = 0.0, patience: int = 401, nan_at: int | None = None):
    """Run the search with every evaluated point recorded: [(image, step, x, loss, reached)]."""
    seen: list[tuple[int, int, torch.Tensor, torch.Tensor, bool]] = []
    calls = [0]

    def fn(x, index):
        loss, done = loss_fn(x, index)
        if nan_at is not None and calls[0] == nan_at:
            loss = loss * float("nan")
        for k, i in enumerate(index.tolist()):
            seen.append((i, calls[0], x[k, 0].detach().clone(), loss[k].detach().clone(), bool(done[k])))
        calls[0] += 1
        return loss, done

    result = per_image_adam(torch.zeros(2, 1), fn, SearchBudget(steps=400, learning_rate=0.05, tolerance=tolerance,
                                                                patience=patience, refine_steps=refine_steps))
    return result, seen


@pytest.mark.parametrize("refine_steps", [0, 7, 300])
def test_the_search_returns_the_lowest_loss_visited_point_that_reaches_the_goal(refine_steps):
    result, seen = _recorded_search(refine_steps)
    assert result.reached.all()
    for i in range(2):
        crossing = [(loss, x, step) for image, step, x, loss, done in seen if image == i and done]
        first = crossing[0][2]
        loss, x, _ = min(crossing, key=lambda c: float(c[0]))
        assert torch.equal(result.variables[i, 0], x) and torch.equal(result.loss[i], loss)
        # It stops exactly refine_steps Adam steps after the first crossing.
        assert int(result.steps_used[i]) == min(first + refine_steps, 400)
    if refine_steps == 0:  # the first crossing point itself, one step of at most ~lr past the goal
        assert (result.variables[:, 0] >= 1.0).all() and (result.variables[:, 0] < 1.06).all()


def test_refinement_returns_the_lowest_loss_point_that_still_reaches_the_goal():
    plain, refined = _search(0), _search(300)
    assert refined.reached.all()
    x = refined.variables[:, 0]
    assert (x >= 1.0).all()
    assert (refined.loss <= plain.loss).all()
    # Image 0: the loss's own minimum is above the goal, and refinement walks to it.
    grid = torch.linspace(1.0, 3.0, 2001)[:, None]
    optimum = grid[loss_fn(grid, torch.zeros(2001, dtype=torch.long))[0].argmin(), 0]
    assert float(x[0]) == pytest.approx(float(optimum), abs=0.02)
    assert float(x[0]) > float(plain.variables[0, 0]) + 0.2
    # Image 1: the minimum is below the goal; the point returned is the best one that crossed,
    # and its loss is the loss reported.
    assert float(x[1]) < 1.1
    assert torch.allclose(refined.loss, loss_fn(refined.variables, torch.arange(2))[0])
    assert (refined.steps_used > plain.steps_used).all()


def test_the_convergence_rule_does_not_cut_refinement_short():
    """Around the goal the loss oscillates; a convergence stop there would return the
    first crossing point and make refine_steps a no-op."""
    strict, _ = _recorded_search(300, tolerance=1e-3, patience=10)
    free, _ = _recorded_search(300)
    assert torch.equal(strict.variables, free.variables)
    assert torch.equal(strict.steps_used, free.steps_used)


def test_a_nan_loss_never_replaces_a_better_crossing_point():
    clean, seen = _recorded_search(300)
    # Poison one evaluation well inside the refinement of both images.
    late = max(step for image, step, *_ in seen) - 20
    poisoned, _ = _recorded_search(300, nan_at=late)
    assert torch.isfinite(poisoned.loss).all()
    assert torch.allclose(poisoned.variables, clean.variables, atol=1e-3)


def test_an_image_refines_the_same_alone_as_in_a_batch():
    both = _search(50)
    for i in range(2):
        alone = _search(50, slice(i, i + 1))
        assert torch.equal(alone.variables[0], both.variables[i])
        assert int(alone.steps_used[0]) == int(both.steps_used[i])


def test_a_negative_refinement_budget_is_refused():
    with pytest.raises(ValueError, match="refine_steps"):
        SearchBudget(refine_steps=-1)


def test_the_crossing_loss_is_the_margin_bce_before_the_crossing_and_flat_after_it():
    from explainers.optimise import crossing_loss

    logit = torch.tensor([-3.0, 0.5, 1.5, 4.0, 3.0, -0.5, -1.5, -4.0], requires_grad=True)
    wanted = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    loss, reached = crossing_loss(logit, wanted, margin=1.0)
    assert reached.tolist() == [False, False, True, True, False, False, True, True]
    sign = 2 * wanted - 1
    bce = F.binary_cross_entropy_with_logits(logit - sign, wanted, reduction="none")
    assert torch.allclose(loss[~reached], bce[~reached])
    assert torch.allclose(loss[reached], torch.full((4,), 0.6931), atol=1e-4)
    (grad,) = torch.autograd.grad(loss.sum(), logit)
    assert (grad[reached] == 0).all() and (grad[~reached] != 0).all()


def test_the_counterfactual_loss_adds_the_place_weighted_penalty_to_the_crossing_loss():
    from explainers.optimise import counterfactual_loss, crossing_loss

    logit, wanted = torch.tensor([-2.0, 2.0]), torch.tensor([1.0, 1.0])
    penalty = torch.zeros(2, 1, 2, 2)
    penalty[:, :, 0, 0] = 1.0  # the same change, in the one corner
    cost = torch.ones(2, 1, 2, 2)
    cost[1, :, 0, 0] = 8.0  # for the second image that corner lies outside the lungs
    loss, reached = counterfactual_loss(logit, wanted, 1.0, penalty=penalty, cost=cost, weight=0.5)
    crossing, crossed = crossing_loss(logit, wanted, 1.0)
    assert torch.equal(reached, crossed) and reached.tolist() == [False, True]
    assert torch.allclose(loss, crossing + 0.5 * torch.tensor([1.0, 8.0]) / 4)


def test_explainer_parameters_from_a_command_line_are_typed():
    from explainers.base import parameter_overrides

    assert parameter_overrides(["outside_lungs=8", "tolerance=1e-3", "area_weight=0.3", "mode=gradient_shift",
                                "refine=true"]) == {"outside_lungs": 8, "tolerance": 0.001, "area_weight": 0.3,
                                                    "mode": "gradient_shift", "refine": True}
    assert isinstance(parameter_overrides(["tolerance=1e-3"])["tolerance"], float)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parameter_overrides(["outside_lungs"])
