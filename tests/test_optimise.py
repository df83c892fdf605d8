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


def test_without_refinement_the_search_stops_at_the_first_point_that_reaches_the_goal():
    result = _search(0)
    assert result.reached.all()
    x = result.variables[:, 0]
    assert (x >= 1.0).all() and (x < 1.0 + 0.06).all()  # one step of at most ~lr past the goal
    # Stopped there: far fewer steps than the budget, and exactly the step it crossed.
    assert (result.steps_used < 100).all()


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
