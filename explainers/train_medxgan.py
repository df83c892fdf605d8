"""Training loop for medXGAN (tensors in, weights + log out).

Against a frozen classifier f (its logit, shifted by logit(threshold) so that
"negative" means below the bundle's decision threshold). Each step draws a class
c ~ Bernoulli(1/2) per sample, z1 ~ N(0, I), and z2 = 0 for c = 0, z2 ~ N(0, I) for c = 1:

    D step   hinge:  relu(1 - D(x)) + relu(1 + D(G(z)))
    G step   w_cls * BCE(f(up(G(z))) - t -+ m, c)      one sigmoid on the one logit
           - w_gan * D(G(z))
           + w_walk * BCE(f(x'), 1 - yhat) + w_prox * L1(x', x)      the walk on real images
    E step   w_lat * MSE(E(G(z)), z)                    codes of generated images
           + w_rec * [L1 + MSE](G(E(x)), x)             real images (G frozen here)

The last two terms are not in the paper. x' = x + up(G(z1, z2') - G(z1, z2)) is the
counterfactual the explainer shows for a real image x, with (z1, z2) = E(x) and
z2' = 0 where the classifier calls x positive (yhat = 1), z2' = z2 + N(0, I) where it
calls it negative. Without them the generator learned to make its *own* images
cross the threshold, but the same latent walk added to a real radiograph barely
moved the classifier: after two epochs on the full training split not one positive
call of the validation sample flipped (negative calls did). These terms train the
property the method relies on, "moving z2 changes what the classifier cares
about", where it is used.

D and E see the generator's working size (real images are area-resampled to it); the
classifier sees G's image bilinearly resampled to its input size. The encoder is
the fast inversion route: trained alongside G, it replaces the official code's
5,000 Adam steps from z = 0 with E(x) plus a short refinement.
Random geometric augmentation on every batch; epochs reseed from (seed, epoch),
so a resumed run is bit-identical to an uninterrupted one on the same device.
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
from explainers.evaluation import proximity_ssim
from explainers.base import threshold_logit
from explainers.medxgan import MedxganEncoder, MedxganExplainer, MedxganGenerator, to_input, to_working
from explainers.sagen import PatchCritic
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
class MedxganLossWeights:
    classification: float = 1.0
    adversarial: float = 1.0
    walk: float = 1.0  # the latent walk, added to real images, crosses the threshold (not in the paper)
    proximity: float = 1.0  # ... with an L1 cost on the change it makes
    latent: float = 1.0  # encoder: codes of generated images
    reconstruction: float = 1.0  # encoder: real images through the frozen generator


@dataclass
class MedxganTrainingConfig(SettingsDict):
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 2e-4  # generator and encoder
    discriminator_learning_rate: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    threshold: float = 0.5  # the bundle's decision threshold on P(positive)
    margin: float = 1.0  # logits by which generated images must sit on their class's side of the threshold
    weights: MedxganLossWeights = field(default_factory=MedxganLossWeights)
    rotate: float = 0.1  # augmentation: radians, relative scale, pixels
    scale: float = 0.05
    translate: float = 6.0
    validation_images: int = 32  # per-epoch selection runs the explainer on this many validation images
    seed: int = 0
    device: str = "cpu"


def evaluate_medxgan(explainer: MedxganExplainer, classifier: nn.Module, images: torch.Tensor, *,
                     batch_size: int = 32, device: str = "cpu") -> dict[str, float]:
    """Validity, proximity, inversion error and cost of the explainer on a set of images."""
    sums = {"flipped": 0.0, "flipped_pos": 0.0, "n_pos": 0.0, "proximity": 0.0, "ssim": 0.0, "inversion": 0.0,
            "steps": 0.0}
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        x = as_float(images[start:start + batch_size]).to(device)
        e = explainer.explain(x, classifier)
        called = e.probability >= explainer.threshold
        flips = torch.tensor([c["flipped"] for c in e.checks], device=called.device)
        sums["flipped"] += float(flips.sum())
        sums["flipped_pos"] += float((flips & called).sum())
        sums["n_pos"] += float(called.sum())
        sums["proximity"] += sum(c["proximity_l1"] for c in e.checks)
        sums["inversion"] += sum(c["inversion_l1"] for c in e.checks)
        sums["steps"] += sum(c["steps_used"] for c in e.checks)
        sums["ssim"] += float(proximity_ssim(x, e.counterfactuals[:, -1]).sum())
    n = max(len(images), 1)
    n_pos, n_neg = sums["n_pos"], len(images) - sums["n_pos"]
    return {"flip_rate": sums["flipped"] / n,
            "flip_rate_called_positive": sums["flipped_pos"] / n_pos if n_pos else float("nan"),
            "flip_rate_called_negative": (sums["flipped"] - sums["flipped_pos"]) / n_neg if n_neg else float("nan"),
            "proximity_l1": sums["proximity"] / n, "proximity_ssim": sums["ssim"] / n,
            "inversion_l1": sums["inversion"] / n, "steps_used": sums["steps"] / n,
            "ms_per_image": 1000.0 * (time.perf_counter() - started) / n, "n": float(len(images))}


def _selection_key(metrics: dict[str, float]) -> tuple[float, float]:
    # Highest validation flip rate; then the closest inversion.
    return (round(metrics["flip_rate"], 3), -metrics["inversion_l1"])


def train_medxgan(
    generator: MedxganGenerator,
    encoder: MedxganEncoder,
    classifier: nn.Module,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    config: MedxganTrainingConfig,
    checkpoint_dir: Path,
    *,
    discriminator: nn.Module | None = None,
    explainer_parameters: dict | None = None,
    log_path: Path | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train in place; leaves the best-validation weights in ``generator`` and ``encoder``.

    ``train_images`` / ``val_images``: (N, C, H, W), uint8 (x 255) or float in [0, 1],
    at the classifier's input size. The classifier is frozen and kept in eval mode.
    """
    started = time.perf_counter()
    device = config.device
    set_determinism(seed=config.seed)
    discriminator = discriminator if discriminator is not None else PatchCritic(in_channels=generator.in_channels)
    for part in (generator, encoder, discriminator):
        part.to(device)
    restore_classifier = freeze(classifier.to(device))
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.learning_rate, betas=config.betas)
    opt_e = torch.optim.Adam(encoder.parameters(), lr=config.learning_rate, betas=config.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.discriminator_learning_rate, betas=config.betas)
    augment = augmentation(config)
    w = config.weights
    offset = threshold_logit(config.threshold)
    size, input_shape = generator.size, tuple(train_images.shape[-2:])
    # A seeded random sample: the validation split is sorted by class, its first images are one class.
    pick = torch.randperm(len(val_images), generator=torch.Generator().manual_seed(config.seed))
    selection = val_images[pick[:config.validation_images].sort().values]

    checkpoints = gan_checkpoints(checkpoint_dir, generator=generator, discriminator=discriminator, opt_g=opt_g,
                                  opt_d=opt_d, n_train=len(train_images), settings=config.as_dict(),
                                  extra_parts={"encoder": encoder, "opt_e": opt_e},
                                  best_parts=("generator", "encoder"))
    state: TrainingState = checkpoints.resume()
    log_path = log_path or checkpoint_dir / "medxgan_training_log.csv"
    elapsed_before = state.elapsed_s

    def validate() -> dict[str, float]:
        generator.eval()
        encoder.eval()
        explainer = MedxganExplainer(generator=generator, encoder=encoder, threshold=config.threshold,
                                     **(explainer_parameters or {}))
        metrics = evaluate_medxgan(explainer, classifier, selection, device=device)
        generator.requires_grad_(True)  # the explainer froze them for its searches
        encoder.requires_grad_(True)
        return metrics

    def real_walk(x: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE towards the other class, L1 change) of the walk the explainer shows for real x."""
        with torch.no_grad():
            z1, z2 = generator.split(encoder(real))
            called = (classifier(x).reshape(-1).float() - offset >= 0).float()
            end = torch.where(called[:, None] > 0, torch.zeros_like(z2), z2 + torch.randn_like(z2))
        start = torch.cat([z1, z2], dim=1)
        change = generator(torch.cat([z1, end], dim=1)) - generator(start)
        shown = (x + to_input(change, input_shape)).clamp(0.0, 1.0)
        wanted = 1.0 - called
        logits = classifier(shown).reshape(-1).float() - offset
        return (F.binary_cross_entropy_with_logits(logits - config.margin * (2.0 * wanted - 1.0), wanted),
                F.l1_loss(shown, x))

    try:
        for epoch in range(state.start_epoch, config.epochs):
            sums: dict[str, float] = {}
            seen = 0
            batches = augmented_batches(train_images, epoch=epoch, seed=config.seed, batch_size=config.batch_size,
                                        augment=augment, device=device)
            for step, x in enumerate(batches):
                generator.train()
                encoder.train()
                discriminator.train()
                n = len(x)
                real = to_working(x, size)
                wanted = torch.randint(0, 2, (n,), device=device).float()
                z1 = torch.randn(n, generator.anatomy_dim, device=device)
                z2 = torch.randn(n, generator.pathology_dim, device=device) * wanted[:, None]
                z = torch.cat([z1, z2], dim=1)
                fake = generator(z)

                discriminator.requires_grad_(True)
                opt_d.zero_grad(set_to_none=True)
                loss_d = F.relu(1.0 - discriminator(real)).mean() + F.relu(1.0 + discriminator(fake.detach())).mean()
                loss_d.backward()
                opt_d.step()

                discriminator.requires_grad_(False)
                opt_g.zero_grad(set_to_none=True)
                logits = classifier(to_input(fake, input_shape)).reshape(-1).float() - offset
                cls = F.binary_cross_entropy_with_logits(logits - config.margin * (2.0 * wanted - 1.0), wanted)
                gan = -discriminator(fake).mean()
                walk, prox = real_walk(x, real)
                loss_g = w.classification * cls + w.adversarial * gan + w.walk * walk + w.proximity * prox
                loss_g.backward()
                opt_g.step()

                generator.requires_grad_(False)
                opt_e.zero_grad(set_to_none=True)
                latent = F.mse_loss(encoder(fake.detach()), z)
                rebuilt = generator(encoder(real))
                rec = F.l1_loss(rebuilt, real) + F.mse_loss(rebuilt, real)
                loss_e = w.latent * latent + w.reconstruction * rec
                loss_e.backward()
                opt_e.step()
                generator.requires_grad_(True)

                with torch.no_grad():
                    class_rate = float(((logits >= 0).float() == wanted).float().mean())
                values = {"loss_g": loss_g.item(), "loss_d": loss_d.item(), "loss_e": loss_e.item(),
                          "classification": cls.item(), "gan": gan.item(), "walk": walk.item(),
                          "walk_proximity": prox.item(), "latent": latent.item(),
                          "reconstruction": rec.item(), "train_class_rate": class_rate}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                seen += n
                if on_step:
                    on_step(epoch, step + 1, {k: v / seen for k, v in sums.items()})

            val = validate()
            losses = {k: v / max(seen, 1) for k, v in sums.items()}
            finish_epoch(checkpoints, state, epoch=epoch, losses=losses, validation=val, key=_selection_key(val),
                         seconds=elapsed_before + time.perf_counter() - started, log_path=log_path, on_epoch=on_epoch)

        checkpoints.load_best()
        validation = validate()
        generator.eval()
        encoder.eval()
    finally:
        restore_classifier()
    return TrainingResult(best_epoch=state.best_epoch, validation=validation, log=state.log,
                                 wall_time_s=state.elapsed_s)
