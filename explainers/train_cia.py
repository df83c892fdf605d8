"""Training of the two inpainters of cia (Major et al. 2020), declared for
``explainers.training.fit``.

Each inpainter learns to fill random smooth masks (blobs and rectangles of varied
size, some at partial opacity; ``explainers.cia.random_masks``) of images of its own
class, by ground-truth label: ``fill_negative`` on label 0, ``fill_positive`` on label 1:

    loss = L1(fill, x) over the whole image + hole_weight * L1(fill, x) inside the mask

No classifier is involved, so training is cheap. Both networks train in the same
epoch, one after the other; the smaller class is repeated so that both take the same
number of steps. Augmented at the input size, then area-downsampled to the
inpainter's working size. Masks and augmentation are reseeded from (seed, epoch,
network), so a resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from explainers._helpers import as_float, to_working, working_size
from explainers.cia import CiaExplainer, Inpainter, hole_l1, random_masks
from explainers.training import (
    Trainer,
    TrainingSettings,
    adam,
    augmented_batches,
    explainer_parameter,
    from_bundle,
    option,
)
from explainers.validity import evaluate_explainer

PARTS = ("fill_negative", "fill_positive")  # trained on label 0 and label 1
_VAL_MASK_SEED = 4242  # fixed validation masks: the same for every epoch
EVALUATION_BATCH = 32


@dataclass
class CiaTrainingConfig(TrainingSettings):
    epochs: int = option(8, "total epochs; a checkpoint in <bundle>/.checkpoints/cia is resumed (a finished one "
                            "only re-evaluates, e.g. with other search settings)")
    learning_rate: float = option(1e-3, "Adam learning rate of the inpainters")
    betas: tuple[float, float] = (0.9, 0.999)
    hole_weight: float = 5.0  # L1 inside the mask, on top of the whole-image L1
    size: int = option(64, "side the inpainters work at (multiple of 16); the fill is upsampled to the "
                           "bundle's input size")
    width: int = option(16, "U-Net base width: features (w, 2w, 4w, 8w, 16w, w)")
    threshold: float = from_bundle(0.5)  # the bundle's decision threshold (the explainer's)
    # The per-image mask search (CiaExplainer), stored in bundle.yaml.
    steps: int = explainer_parameter(1, "images on the path that scales the mask from 0 to m")
    search_steps: int = explainer_parameter(60, "per-image mask search: at most this many Adam steps")
    search_learning_rate: float = explainer_parameter(0.4, "Adam learning rate of the mask search",
                                                      name="learning_rate")
    tolerance: float = explainer_parameter(1e-3, "mask search: relative improvement that counts")
    patience: int = explainer_parameter(10, "mask search: steps without improvement before stopping")
    margin: float = explainer_parameter(1.0, "logits by which the counterfactual must cross the threshold")
    area_weight: float = explainer_parameter(1.0, "lambda1: weight of the mask's mean area")
    tv_weight: float = explainer_parameter(3.0, "lambda2: weight of the mask's total variation")
    mask_size: int = explainer_parameter(16, "side of the mask's logit grid")
    initial_mask: float = explainer_parameter(0.1, "the search's starting mask value, in (0, 1)")
    outside_lungs: float = explainer_parameter(0.0, "mask area outside the lung fields costs 1 + this times "
                                                    "more (0: the paper's plain mean area)")
    refine_steps: int = explainer_parameter(0, "mask search: Adam steps after the decision has crossed, "
                                               "shrinking the mask (0: stop at the first crossing)")


@torch.no_grad()
def evaluate_inpainter(network: Inpainter, images: torch.Tensor, *, batch_size: int = 64,
                       device: str = "cpu") -> dict[str, float]:
    """Reconstruction error on fixed random masks (seeded, the same every call):
    mean |fill - x| inside the mask (hole_l1) and over the whole image (image_l1)."""
    network.eval()
    hole = whole = 0.0
    generator = torch.Generator().manual_seed(_VAL_MASK_SEED)
    for start in range(0, len(images), batch_size):
        x = to_working(as_float(images[start:start + batch_size]).to(device), network.size)
        masks = random_masks(len(x), x.shape[-1], generator, device=device)
        prediction = network.fill(x, masks)
        hole += float(hole_l1(prediction, x, masks).sum())
        whole += float((prediction - x).abs().flatten(1).mean(1).sum())
    n = max(len(images), 1)
    return {"hole_l1": hole / n, "image_l1": whole / n, "n": float(len(images))}


def evaluate_inpainters(networks: dict[str, Inpainter], images: torch.Tensor, labels: torch.Tensor, *,
                        device: str = "cpu") -> dict[str, float]:
    """Each inpainter on the images of its own class; ``hole_l1`` is their mean."""
    out: dict[str, float] = {}
    for label, part in enumerate(PARTS):
        metrics = evaluate_inpainter(networks[part], images[labels == label], device=device)
        out[f"{part}_hole_l1"], out[f"{part}_image_l1"] = metrics["hole_l1"], metrics["image_l1"]
    out["hole_l1"] = (out[f"{PARTS[0]}_hole_l1"] + out[f"{PARTS[1]}_hole_l1"]) / 2
    return out


class CiaTrainer(Trainer):
    """Both inpainters, each on the training images of its class (labels 0 and 1)."""

    name = "cia"
    settings_class = CiaTrainingConfig
    best_parts = PARTS
    selection = "lowest validation hole L1 (mean of both inpainters, fixed seeded masks)"
    needs_classifier = False
    progress_keys = ("fill_negative_hole_l1", "fill_positive_hole_l1")

    def __init__(self, settings: CiaTrainingConfig, networks: dict[str, Inpainter], train_images: torch.Tensor,
                 train_labels: torch.Tensor, val_images: torch.Tensor, val_labels: torch.Tensor):
        """``networks``: {"fill_negative": ..., "fill_positive": ...}; labels (N,) 0 / 1.
        Raises ValueError for other networks or a class without training images."""
        if set(networks) != set(PARTS):
            raise ValueError(f"networks must be {PARTS}, got {sorted(networks)}")
        super().__init__(settings, train_images, val_images)
        self.val_labels = val_labels
        self.by_class = {part: train_images[train_labels == label] for label, part in enumerate(PARTS)}
        for part, images in self.by_class.items():
            if len(images) == 0:
                raise ValueError(f"no training images of the class {part} fills (label {PARTS.index(part)})")
        self.inpainters = {part: networks[part].to(self.device) for part in PARTS}
        self.optimisers = {part: adam(self.inpainters[part], settings.learning_rate, settings.betas)
                           for part in PARTS}
        # The smaller class is repeated (whole passes) so both networks take the same number of steps.
        largest = max(len(v) for v in self.by_class.values())
        self.repeats = {part: max(1, round(largest / len(v))) for part, v in self.by_class.items()}

    def networks(self) -> dict[str, nn.Module]:
        return dict(self.inpainters)

    def parts(self) -> dict[str, Any]:
        return {**self.inpainters, **{f"opt_{k}": v for k, v in self.optimisers.items()}}

    def n_train(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.by_class.items()}

    def steps_per_epoch(self) -> int:
        b = self.settings.batch_size
        return sum(-(-len(v) * self.repeats[part] // b) for part, v in self.by_class.items())

    def batches(self, epoch: int) -> Iterator[tuple[str, torch.Tensor, torch.Generator]]:
        for index, part in enumerate(PARTS):
            images = self.by_class[part]
            images = images.repeat(self.repeats[part], 1, 1, 1) if self.repeats[part] > 1 else images
            part_seed = self.settings.seed * 2 + index
            masks_rng = torch.Generator().manual_seed((part_seed * 100_003 + epoch + 7) % (2**31))
            for x in augmented_batches(images, epoch=epoch, seed=part_seed, batch_size=self.settings.batch_size,
                                       augment=self.augment, device=self.device):
                yield part, x, masks_rng

    def step(self, batch: tuple[str, torch.Tensor, torch.Generator]) -> tuple[dict[str, float], int]:
        part, x, masks_rng = batch
        network, optimiser = self.inpainters[part], self.optimisers[part]
        x = to_working(x, network.size)
        masks = random_masks(len(x), x.shape[-1], masks_rng, device=self.device)
        prediction = network.fill(x, masks)
        hole = hole_l1(prediction, x, masks).mean()
        whole = F.l1_loss(prediction, x)
        loss = whole + self.settings.hole_weight * hole
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return {f"{part}_hole_l1": hole.item(), f"{part}_image_l1": whole.item()}, len(x)

    def validate(self) -> dict[str, float]:
        return evaluate_inpainters(self.inpainters, self.val_images, self.val_labels, device=self.device)

    def selection_key(self, metrics: dict[str, float]) -> tuple[float, ...]:
        return (-metrics["hole_l1"],)

    def explainer(self) -> CiaExplainer:
        return CiaExplainer(**self.inpainters, threshold=self.settings.threshold,
                            **self.settings.explainer_parameters())

    # -- the bundle ------------------------------------------------------------------

    @classmethod
    def for_bundle(cls, settings, bundle, classifier, splits) -> "CiaTrainer":
        spec, w = bundle.spec, settings.width
        settings = dataclasses.replace(settings, threshold=spec.task.threshold)
        torch.manual_seed(settings.seed)
        size = working_size(settings.size, max(spec.input.size), 16)
        networks = {part: Inpainter(features=(w, 2 * w, 4 * w, 8 * w, 16 * w, w), size=size,
                                    in_channels=spec.input.channels) for part in PARTS}
        return cls(settings, networks, splits["train"].images, splits["train"].labels, splits["val"].images,
                   splits["val"].labels)

    def test(self, classifier, images, on_batch=None) -> dict[str, float]:
        return evaluate_explainer(self.explainer(), classifier, images, batch_size=EVALUATION_BATCH,
                                  device=self.device, on_batch=on_batch)

    def bundle_parameters(self) -> dict[str, Any]:
        return {"architecture": "medxplain.Inpainter (MONAI BasicUNet, input (x*(1-m), m), sigmoid fill used "
                                "inside the mask only)",
                "network": self.inpainters[PARTS[0]].config(), **self.settings.explainer_parameters(),
                "fills": {"fill_negative": "trained on negative-class images; used for cases called positive",
                          "fill_positive": "trained on positive-class images; used for cases called negative"}}

    def bundle_training(self) -> dict[str, Any]:
        return {"loss": f"L1(fill, x) + {self.settings.hole_weight} * L1 inside the mask",
                "masks": "random smooth blobs (thresholded 3-8 px noise, soft edges) of 5-60% area, half joined "
                         "by a rectangle, a third at partial opacity",
                "targets": "by ground-truth label: fill_negative on label 0, fill_positive on label 1 "
                           "(no classifier)",
                "test_evaluation": f"per-image mask search on every test image, batches of {EVALUATION_BATCH}, "
                                   f"{torch.get_num_threads()} thread(s) on {self.device}"}
