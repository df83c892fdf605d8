"""Training loop for the progressive-exaggeration generator (tensors in, weights + log out).

Against a frozen classifier f (its logit; k_x = bin of f(x), k a requested bin,
c_k its centre):

    D step   hinge:  relu(1 - D(x, k_x)) + relu(1 + D(G(x, k), k))
    G step   w_cls  * BCE(f(G(x, k)), c_k)                 classifier consistency
           + w_rec  * L1(G(x, k_x), x)                      reconstruction
           + w_cyc  * L1(G(G(x, k), k_x), x)                cycle
           + w_prox * L1(G(x, k), x)                        keep anatomy and devices
           - w_gan  * D(G(x, k), k)

Requested bins are drawn uniformly, so every posterior is trained even though the
classifier's own posteriors pile up near 0 and 1. The proximity term is not in the
paper (whose generator re-synthesises the image); with a residual generator it is
what keeps the change to what the classifier needs. Random geometric augmentation
on every batch; epochs reseed from (seed, epoch), so resuming is bit-identical.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from monai.utils import set_determinism
from torch import nn

from explainers.checkpoints import TrainingState, gan_checkpoints
from explainers.exaggeration import ConditionalGenerator, ProjectionCritic, bin_centre, bin_of, sweep_targets
from explainers.training import (
    SettingsDict,
    TrainingResult,
    as_float,
    augmentation,
    augmented_batches,
    finish_epoch,
    freeze,
)


@dataclass
class ExaggerationLossWeights:
    classification: float = 1.0
    reconstruction: float = 10.0
    cycle: float = 5.0
    proximity: float = 1.0
    adversarial: float = 0.1


@dataclass
class ExaggerationTrainingConfig(SettingsDict):
    epochs: int = 8
    batch_size: int = 16
    learning_rate: float = 2e-4
    discriminator_learning_rate: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    threshold: float = 0.5  # the bundle's decision threshold on P(positive)
    weights: ExaggerationLossWeights = field(default_factory=ExaggerationLossWeights)
    rotate: float = 0.1  # augmentation: radians, relative scale, pixels
    scale: float = 0.05
    translate: float = 6.0
    seed: int = 0
    device: str = "cpu"


@torch.no_grad()
def evaluate_exaggeration(generator: ConditionalGenerator, classifier: nn.Module, images: torch.Tensor,
                          threshold: float, *, steps: int = 5, batch_size: int = 32,
                          device: str = "cpu") -> dict[str, float]:
    """Validity, proximity and posterior tracking of the sweep f(x) -> other class."""
    generator.eval()
    totals = {"flipped": 0.0, "flipped_pos": 0.0, "n_pos": 0.0, "proximity": 0.0, "reconstruction": 0.0,
              "tracking": 0.0, "prob_change": 0.0}
    for start in range(0, len(images), batch_size):
        x = as_float(images[start:start + batch_size]).to(device)
        b = len(x)
        px = torch.sigmoid(classifier(x).reshape(-1).float())
        requested = sweep_targets(px, threshold, steps)
        path = generator(x.repeat_interleave(steps, dim=0), bin_of(requested.flatten(), generator.bins))
        pp = torch.sigmoid(classifier(path).reshape(-1).float()).reshape(b, steps)
        path = path.reshape(b, steps, *x.shape[1:])
        called = px >= threshold
        flips = (pp[:, -1] >= threshold) != called
        totals["flipped"] += float(flips.sum())
        totals["flipped_pos"] += float((flips & called).sum())
        totals["n_pos"] += float(called.sum())
        totals["proximity"] += float((path[:, -1] - x).abs().flatten(1).mean(1).sum())
        totals["reconstruction"] += float((path[:, 0] - x).abs().flatten(1).mean(1).sum())
        totals["tracking"] += float((pp - requested).abs().mean(1).sum())
        totals["prob_change"] += float((pp[:, -1] - px).abs().sum())
    n = max(len(images), 1)
    n_pos, n_neg = totals["n_pos"], len(images) - totals["n_pos"]
    return {"flip_rate": totals["flipped"] / n,
            "flip_rate_called_positive": totals["flipped_pos"] / n_pos if n_pos else float("nan"),
            "flip_rate_called_negative": (totals["flipped"] - totals["flipped_pos"]) / n_neg if n_neg else float("nan"),
            "proximity_l1": totals["proximity"] / n, "reconstruction_l1": totals["reconstruction"] / n,
            "posterior_tracking_mae": totals["tracking"] / n, "probability_change": totals["prob_change"] / n,
            "n": float(len(images))}


def _selection_key(metrics: dict[str, float]) -> tuple[float, float]:
    # Highest flip rate; then the path that follows the requested posterior best.
    return (round(metrics["flip_rate"], 3), -metrics["posterior_tracking_mae"])


def train_exaggeration(
    generator: ConditionalGenerator,
    classifier: nn.Module,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    config: ExaggerationTrainingConfig,
    checkpoint_dir: Path,
    *,
    discriminator: ProjectionCritic | None = None,
    log_path: Path | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train in place; leaves the best-validation weights in ``generator``.

    ``train_images`` / ``val_images``: (N, C, H, W), uint8 (x 255) or float in [0, 1],
    at the classifier's input size. The classifier is frozen and kept in eval mode.
    """
    started = time.perf_counter()
    device, bins = config.device, generator.bins
    set_determinism(seed=config.seed)
    discriminator = discriminator if discriminator is not None else ProjectionCritic(
        bins=bins, in_channels=generator.in_channels)
    generator.to(device)
    discriminator.to(device)
    restore_classifier = freeze(classifier.to(device))
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.learning_rate, betas=config.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.discriminator_learning_rate, betas=config.betas)
    augment = augmentation(config)
    w = config.weights
    critic_size = generator.size

    def critic(images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # The discriminator looks at the generator's working resolution.
        if critic_size is not None and images.shape[-1] != critic_size:
            images = F.interpolate(images, size=(critic_size, critic_size), mode="area")
        return discriminator(images, k)

    checkpoints = gan_checkpoints(checkpoint_dir, generator=generator, discriminator=discriminator, opt_g=opt_g,
                                  opt_d=opt_d, n_train=len(train_images), settings=config.as_dict())
    state: TrainingState = checkpoints.resume()
    log_path = log_path or checkpoint_dir / "exaggeration_training_log.csv"
    elapsed_before = state.elapsed_s

    try:
        for epoch in range(state.start_epoch, config.epochs):
            generator.train()
            discriminator.train()
            sums: dict[str, float] = {}
            seen = 0
            batches = augmented_batches(train_images, epoch=epoch, seed=config.seed, batch_size=config.batch_size,
                                        augment=augment, device=device)
            for step, x in enumerate(batches):
                n = len(x)
                with torch.no_grad():
                    own = bin_of(torch.sigmoid(classifier(x).reshape(-1).float()), bins)
                wanted = torch.randint(0, bins, (n,), device=device)

                # One generator call for the requested posterior and the reconstruction.
                fake, rebuilt = generator(torch.cat([x, x]), torch.cat([wanted, own])).split(n)
                cycled = generator(fake, own)

                discriminator.requires_grad_(True)
                opt_d.zero_grad(set_to_none=True)
                loss_d = F.relu(1.0 - critic(x, own)).mean() + F.relu(1.0 + critic(fake.detach(), wanted)).mean()
                loss_d.backward()
                opt_d.step()

                discriminator.requires_grad_(False)
                opt_g.zero_grad(set_to_none=True)
                logits = classifier(fake).reshape(-1).float()
                cls = F.binary_cross_entropy_with_logits(logits, bin_centre(wanted, bins))
                rec = F.l1_loss(rebuilt, x)
                cyc = F.l1_loss(cycled, x)
                prox = F.l1_loss(fake, x)
                gan = -critic(fake, wanted).mean()
                loss_g = (w.classification * cls + w.reconstruction * rec + w.cycle * cyc + w.proximity * prox
                          + w.adversarial * gan)
                loss_g.backward()
                opt_g.step()

                with torch.no_grad():
                    tracking = float((torch.sigmoid(logits) - bin_centre(wanted, bins)).abs().mean())
                values = {"loss_g": loss_g.item(), "loss_d": loss_d.item(), "classification": cls.item(),
                          "reconstruction": rec.item(), "cycle": cyc.item(), "proximity": prox.item(),
                          "gan": gan.item(), "train_tracking_mae": tracking}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                seen += n
                if on_step:
                    on_step(epoch, step + 1, {k: v / seen for k, v in sums.items()})

            val = evaluate_exaggeration(generator, classifier, val_images, config.threshold, device=device)
            losses = {k: v / max(seen, 1) for k, v in sums.items()}
            finish_epoch(checkpoints, state, epoch=epoch, losses=losses, validation=val, key=_selection_key(val),
                         seconds=elapsed_before + time.perf_counter() - started, log_path=log_path, on_epoch=on_epoch)

        checkpoints.load_best()
        generator.eval()
        validation = evaluate_exaggeration(generator, classifier, val_images, config.threshold, device=device)
    finally:
        restore_classifier()
    return TrainingResult(best_epoch=state.best_epoch, validation=validation, log=state.log,
                                      wall_time_s=state.elapsed_s)
