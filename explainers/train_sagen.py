"""Training loop for the similar/adversarial generator (tensors in, weights + log out).

Against a frozen classifier and its own thresholded decisions (never the labels):

    D step   hinge:  relu(1 - D(x)) + relu(1 + D(S(x))) + relu(1 + D(A(x)))
    G step   w_cls  * [BCE(f(S(x)) - t, yhat) + BCE(f(A(x)) - t -+ m, 1 - yhat)]
           + w_rec  * [L1(S(x), x) + L2(S(x), x)]
           + w_prox * L1(A(x), x)
           - w_gan  * [D(S(x)) + D(A(x))] / 2

with yhat = [f(x) >= threshold] on the *augmented* x and t = logit(threshold), so
"classified like x" means on the same side of the bundle's decision threshold; the
adversarial head must cross it by a margin of m logits.
Random geometric augmentation (small rotation, scale, shift) on every batch.

Knows nothing of files or DICOM beyond its own checkpoints and CSV log. Resumable
from the last epoch checkpoint; every epoch reseeds its data order and augmentation
from (seed, epoch), so a resumed run is bit-identical to an uninterrupted one on
the same device.
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

from explainers.base import threshold_logit
from explainers.checkpoints import TrainingState, gan_checkpoints
from explainers.sagen import PatchCritic, SagenGenerator
from explainers.training import SettingsDict, as_float, augmentation, augmented_batches, finish_epoch, freeze


@dataclass
class SagenLossWeights:
    classification: float = 1.0  # each head, BCE on logits shifted by logit(threshold)
    reconstruction: float = 10.0  # similar head: L1 + L2 to the input
    proximity: float = 2.0  # adversarial head: L1 to the input (5 left test NORMAL->PNEUMONIA at 70% flips)
    adversarial: float = 0.1  # realism: hinge generator loss, both heads


@dataclass
class SagenTrainingConfig(SettingsDict):
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 2e-4  # generator
    discriminator_learning_rate: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    threshold: float = 0.5  # the bundle's decision threshold on P(positive)
    weights: SagenLossWeights = field(default_factory=SagenLossWeights)
    # Augmentation: rotation (radians), relative scale, shift (pixels at the input size).
    rotate: float = 0.1
    scale: float = 0.05
    translate: float = 6.0
    # Weight each case's classification losses by the inverse frequency of the class the
    # classifier called (74% of Kermany train is pneumonia): without it the adversarial
    # head first learns one universal "make it normal" change and neglects the minority.
    balance_classes: bool = True
    # The adversarial head must cross the threshold by this many logits, not just reach
    # it: counterfactuals that stop right at the threshold flip on validation but not
    # on a shifted test set (Kermany's test split is).
    margin: float = 1.0
    seed: int = 0
    device: str = "cpu"


@dataclass
class SagenTrainingResult:
    best_epoch: int
    validation: dict[str, float]
    called_positive_fraction: float
    log: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0


@torch.no_grad()
def evaluate_sagen(generator: SagenGenerator, classifier: nn.Module, images: torch.Tensor, threshold: float,
                   *, batch_size: int = 64, device: str = "cpu") -> dict[str, float]:
    """Validity and proximity of both heads on a set of images (uint8 or [0, 1] floats)."""
    generator.eval()
    flipped = kept = proximity = similar_l1 = prob_change = 0.0
    n_pos = flipped_pos = 0.0
    for start in range(0, len(images), batch_size):
        x = as_float(images[start:start + batch_size]).to(device)
        similar, adversarial = generator(x)
        p = torch.sigmoid(classifier(torch.cat([x, similar, adversarial])).reshape(-1).float())
        px, ps, pa = p.chunk(3)
        called = px >= threshold
        flips = (pa >= threshold) != called
        flipped += float(flips.sum())
        n_pos += float(called.sum())
        flipped_pos += float((flips & called).sum())
        kept += float(((ps >= threshold) == called).sum())
        proximity += float((adversarial - x).abs().flatten(1).mean(1).sum())
        similar_l1 += float((similar - x).abs().flatten(1).mean(1).sum())
        prob_change += float((pa - px).abs().sum())
    n = max(len(images), 1)
    n_neg = len(images) - n_pos
    return {"flip_rate": flipped / n,
            # per class the classifier called (NaN where it called none of that class)
            "flip_rate_called_positive": flipped_pos / n_pos if n_pos else float("nan"),
            "flip_rate_called_negative": (flipped - flipped_pos) / n_neg if n_neg else float("nan"),
            "similar_kept_rate": kept / n, "proximity_l1": proximity / n,
            "similar_l1": similar_l1 / n, "probability_change": prob_change / n, "n": float(len(images))}


@torch.no_grad()
def called_positive_fraction(classifier: nn.Module, images: torch.Tensor, threshold: float, *,
                             batch_size: int = 64, device: str = "cpu") -> float:
    """Fraction of images the classifier calls positive (at the decision threshold)."""
    positive = 0.0
    for start in range(0, len(images), batch_size):
        x = as_float(images[start:start + batch_size]).to(device)
        positive += float((torch.sigmoid(classifier(x).reshape(-1).float()) >= threshold).sum())
    return positive / max(len(images), 1)


def _selection_key(metrics: dict[str, float]) -> tuple[float, float]:
    # Highest validation flip rate; among equal ones, the smallest distance of both
    # heads to the input (reconstruction of S plus proximity of A).
    return (metrics["flip_rate"], -(metrics["similar_l1"] + metrics["proximity_l1"]))


def train_sagen(
    generator: SagenGenerator,
    classifier: nn.Module,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    config: SagenTrainingConfig,
    checkpoint_dir: Path,
    *,
    discriminator: nn.Module | None = None,
    log_path: Path | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> SagenTrainingResult:
    """Train in place; leaves the best-validation weights in ``generator``.

    ``train_images`` / ``val_images``: (N, C, H, W), uint8 (x 255) or float in [0, 1],
    at the classifier's input size. The classifier is frozen and kept in eval mode.
    """
    started = time.perf_counter()
    device = config.device
    set_determinism(seed=config.seed)
    discriminator = discriminator if discriminator is not None else PatchCritic(in_channels=generator.in_channels)
    generator.to(device)
    discriminator.to(device)
    restore_classifier = freeze(classifier.to(device))
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.learning_rate, betas=config.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.discriminator_learning_rate, betas=config.betas)
    augment = augmentation(config)
    w = config.weights
    offset = threshold_logit(config.threshold)
    critic_size = generator.size
    positive_fraction = called_positive_fraction(classifier, train_images, config.threshold, device=device)
    if config.balance_classes:
        floor = 1.0 / max(len(train_images), 1)
        class_weight = (0.5 / max(1.0 - positive_fraction, floor), 0.5 / max(positive_fraction, floor))
    else:
        class_weight = (1.0, 1.0)

    def critic(images: torch.Tensor) -> torch.Tensor:
        # The discriminator looks at the generator's working resolution.
        if critic_size is not None and images.shape[-1] != critic_size:
            images = F.interpolate(images, size=(critic_size, critic_size), mode="area")
        return discriminator(images)

    checkpoints = gan_checkpoints(checkpoint_dir, generator=generator, discriminator=discriminator, opt_g=opt_g,
                                  opt_d=opt_d, n_train=len(train_images), settings=config.as_dict())
    state: TrainingState = checkpoints.resume()
    log_path = log_path or checkpoint_dir / "sagen_training_log.csv"
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
                    called = (classifier(x).reshape(-1) - offset >= 0).float()

                similar, adversarial = generator(x)
                fakes = torch.cat([similar, adversarial])

                # Discriminator (hinge).
                discriminator.requires_grad_(True)
                opt_d.zero_grad(set_to_none=True)
                loss_d = F.relu(1.0 - critic(x)).mean() + F.relu(1.0 + critic(fakes.detach())).mean()
                loss_d.backward()
                opt_d.step()

                # Generator.
                discriminator.requires_grad_(False)
                opt_g.zero_grad(set_to_none=True)
                logits = classifier(fakes).reshape(-1) - offset
                weight = torch.where(called > 0, class_weight[1], class_weight[0])
                cls_s = F.binary_cross_entropy_with_logits(logits[:n], called, weight=weight)
                wanted = 1.0 - called
                cls_a = F.binary_cross_entropy_with_logits(logits[n:] - config.margin * (2.0 * wanted - 1.0),
                                                           wanted, weight=weight)
                rec = F.l1_loss(similar, x) + F.mse_loss(similar, x)
                prox = F.l1_loss(adversarial, x)
                gan = -critic(fakes).mean()
                loss_g = (w.classification * (cls_s + cls_a) + w.reconstruction * rec + w.proximity * prox
                          + w.adversarial * gan)
                loss_g.backward()
                opt_g.step()

                with torch.no_grad():
                    flips = float(((logits[n:] >= 0).float() != called).float().mean())
                values = {"loss_g": loss_g.item(), "loss_d": loss_d.item(), "cls_similar": cls_s.item(),
                          "cls_adversarial": cls_a.item(), "reconstruction": rec.item(), "proximity": prox.item(),
                          "gan": gan.item(), "train_flip_rate": flips}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                seen += n
                if on_step:
                    on_step(epoch, step + 1, {k: v / seen for k, v in sums.items()})

            val = evaluate_sagen(generator, classifier, val_images, config.threshold,
                                 batch_size=max(config.batch_size, 64), device=device)
            losses = {k: v / max(seen, 1) for k, v in sums.items()}
            finish_epoch(checkpoints, state, epoch=epoch, losses=losses, validation=val, key=_selection_key(val),
                         seconds=elapsed_before + time.perf_counter() - started, log_path=log_path, on_epoch=on_epoch)

        checkpoints.load_best()
        generator.eval()
        validation = evaluate_sagen(generator, classifier, val_images, config.threshold,
                                    batch_size=max(config.batch_size, 64), device=device)
    finally:
        restore_classifier()
    return SagenTrainingResult(best_epoch=state.best_epoch, validation=validation,
                               called_positive_fraction=positive_fraction, log=state.log,
                               wall_time_s=state.elapsed_s)

