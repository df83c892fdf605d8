"""One training framework for every explainer: a method declares a ``Trainer`` (its
settings, networks, one step, its validation and how the best epoch is chosen, and
what goes into bundle.yaml); ``fit`` owns the epochs, resume, checkpoints, the CSV
log and progress callbacks.

Why not pytorch-ignite or ``monai.engines`` (MONAI's engines are ignite engines):
what ``fit`` must guarantee is a resumed run *bit-identical* to an uninterrupted one,
which rests on reseeding the data order, the augmentation and every random draw
from (seed, epoch) at each epoch start (``augmented_batches``), on checkpoints that
refuse a different setup (``EpochCheckpoints`` fingerprints), and on steps that
update two or three networks in turn (GANs) or two networks one after the other
(cia). With ignite we would still write all of that, as handlers, and add a
dependency the project does not have; the loop itself is twenty lines.

Everything random derives from ``settings.seed``: ``Trainer.__init__`` calls MONAI's
``set_determinism`` before the method builds anything.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from abc import ABC, abstractmethod
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterator, get_type_hints

import torch
from monai.transforms import RandAffine
from monai.utils import set_determinism
from torch import nn

from explainers._helpers import as_float, frozen, plain_tensor
from explainers.checkpoints import EpochCheckpoints

#: Settings fields that may change between a run and its resumption.
RESUMABLE_CHANGES = ("epochs", "device")


def explainer_parameter(default: Any, help: str = "", *, name: str | None = None) -> Any:
    """A settings field that is an explainer parameter (stored in bundle.yaml's
    parameters under ``name``, default the field's own, and passed to the explainer's
    constructor): not part of the checkpoint fingerprint, so changing it re-evaluates a
    finished training instead of refusing it."""
    return field(default=default, metadata={"explainer": name or True, "help": help})


def option(default: Any, help: str) -> Any:
    """A settings field with the help text its command-line option shows."""
    return field(default=default, metadata={"help": help})


def from_bundle(default: Any) -> Any:
    """A settings field the bundle decides (e.g. the decision threshold): no option."""
    return field(default=default, metadata={"cli": False})


@dataclass
class TrainingSettings:
    """What every method's training shares. Methods subclass it, change defaults and
    add their own fields; each field becomes an option of ``medxplain train METHOD``."""

    epochs: int = option(10, "total epochs; a checkpoint in <bundle>/.checkpoints/METHOD is resumed")
    batch_size: int = 16
    learning_rate: float = option(2e-4, "Adam learning rate (generator, or the only network)")
    betas: tuple[float, float] = (0.5, 0.999)
    # Augmentation (MONAI RandAffine): rotation (radians), relative scale, shift (pixels at the input size).
    rotate: float = option(0.1, "augmentation: largest rotation in radians")
    scale: float = option(0.05, "augmentation: largest relative scale change")
    translate: float = option(6.0, "augmentation: largest shift in pixels")
    seed: int = 0
    device: str = option("cpu", "cpu | cuda")

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (nested dataclasses as dicts, tuples as lists)."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def explainer_parameters(self) -> dict[str, Any]:
        """The fields marked ``explainer_parameter``: stored with the weights in bundle.yaml."""
        return {(f.name if f.metadata["explainer"] is True else f.metadata["explainer"]): getattr(self, f.name)
                for f in fields(self) if f.metadata.get("explainer")}

    def fingerprint_settings(self, resumable: tuple[str, ...] = RESUMABLE_CHANGES) -> dict[str, Any]:
        """What a checkpoint must share with a later run to be resumed: every setting
        except those in ``resumable`` and the explainer parameters."""
        skip = set(resumable) | {f.name for f in fields(self) if f.metadata.get("explainer")}
        return {k: v for k, v in self.as_dict().items() if k not in skip}


@dataclass
class TrainingResult:
    """What ``fit`` returns."""

    best_epoch: int  # 0-based; -1 when no epoch ran
    validation: dict[str, float]  # the best epoch's weights, validated again at the end
    log: list[dict[str, float]] = field(default_factory=list)  # one row per epoch (the CSV log)
    wall_time_s: float = 0.0  # training time over all runs (resumed ones included)


def augmentation(settings: TrainingSettings) -> RandAffine:
    """Random rotation, scale and shift from the settings' ``rotate``, ``scale`` and ``translate``."""
    return RandAffine(prob=1.0, rotate_range=settings.rotate, scale_range=settings.scale,
                      translate_range=(settings.translate, settings.translate), padding_mode="border")


def augmented_batches(images: torch.Tensor, *, epoch: int, seed: int, batch_size: int, augment: RandAffine,
                      device: str) -> Iterator[torch.Tensor]:
    """One epoch of augmented batches (B, C, H, W) in [0, 1]. Everything random derives
    from (seed, epoch), so a resumed run is bit-identical to an uninterrupted one."""
    epoch_seed = (seed * 100_003 + epoch) % (2**31)
    torch.manual_seed(epoch_seed)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch_seed))
    augment.set_random_state(seed=epoch_seed)
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        yield torch.stack([plain_tensor(augment(as_float(images[i]))) for i in index]).clamp(0, 1).to(device)


def adam(network: nn.Module, learning_rate: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam over the network's parameters (every trainer's optimiser but the classifier's)."""
    return torch.optim.Adam(network.parameters(), lr=learning_rate, betas=betas)


class Trainer(ABC):
    """A method's training, declared once.

    Subclasses set ``name`` (the method id: checkpoint folder, log file and bundle.yaml
    section), ``settings_class``, ``best_parts`` (the networks best.ckpt keeps and the
    bundle stores as ``<name>_<part>.safetensors``) and ``selection`` (the best-epoch
    rule in words), and implement ``networks``, ``parts``, ``step``, ``validate`` and
    ``selection_key``. For the bundle: ``for_bundle`` builds the networks for a
    bundle's classifier and input, ``test`` scores the trained explainer,
    ``bundle_parameters`` and ``bundle_training`` say what bundle.yaml records.
    """

    name: ClassVar[str]
    settings_class: ClassVar[type[TrainingSettings]]
    best_parts: ClassVar[tuple[str, ...]]
    selection: ClassVar[str]
    needs_classifier: ClassVar[bool] = True  # does training use the bundle's classifier?
    progress_keys: ClassVar[tuple[str, ...]] = ()  # running losses the progress line shows
    resumable_changes: ClassVar[tuple[str, ...]] = RESUMABLE_CHANGES  # settings a resumed run may change

    def __init__(self, settings: TrainingSettings, train_images: torch.Tensor, val_images: torch.Tensor):
        """``train_images`` / ``val_images``: (N, C, H, W), uint8 (x 255) or float in [0, 1],
        at the classifier's input size. Seeds everything (MONAI ``set_determinism``)
        before the method builds its networks and optimisers."""
        if not isinstance(settings, self.settings_class):
            raise TypeError(f"{self.name} trains with {self.settings_class.__name__}, got {type(settings).__name__}")
        self.settings, self.device = settings, settings.device
        set_determinism(seed=settings.seed)
        self.train_images, self.val_images = train_images, val_images
        self.augment = augmentation(settings)

    # -- what a method declares ------------------------------------------------------

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """The networks being trained, by part name (their ``config()`` enters the fingerprint)."""

    @abstractmethod
    def parts(self) -> dict[str, Any]:
        """Everything last.ckpt holds: networks, critics and optimisers, by name."""

    @abstractmethod
    def step(self, batch: Any) -> tuple[dict[str, float], int]:
        """One optimisation step on a batch: (the batch's mean losses and metrics, batch size)."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """Validation metrics of the current weights (logged as ``val_<name>``)."""

    @abstractmethod
    def selection_key(self, metrics: dict[str, float]) -> tuple[float, ...]:
        """Larger is better: the epoch with the largest key is kept (ties: the earlier one)."""

    def batches(self, epoch: int) -> Iterator[Any]:
        """The epoch's batches (default: the training images, augmented, reseeded per epoch)."""
        return augmented_batches(self.train_images, epoch=epoch, seed=self.settings.seed,
                                 batch_size=self.settings.batch_size, augment=self.augment, device=self.device)

    def steps_per_epoch(self) -> int:
        return -(-len(self.train_images) // self.settings.batch_size)

    def n_train(self) -> Any:
        """The training set's size, as the fingerprint records it."""
        return len(self.train_images)

    def frozen(self) -> ContextManager[Any]:
        """Held around the whole fit (GAN methods freeze the classifier they train against)."""
        return contextlib.nullcontext()

    def train_mode(self) -> None:
        for part in self.parts().values():
            if isinstance(part, nn.Module):
                part.train()

    def eval_mode(self) -> None:
        for part in self.parts().values():
            if isinstance(part, nn.Module):
                part.eval()

    def fingerprint(self) -> str:
        """The networks, the training set size and every setting except epochs, device
        and explainer parameters: a checkpoint resumes only for the same."""
        return json.dumps({**{name: net.config() for name, net in self.networks().items()},
                           "n_train": self.n_train(), **self.settings.fingerprint_settings(self.resumable_changes)},
                          sort_keys=True)

    # -- the bundle ------------------------------------------------------------------

    @classmethod
    def for_bundle(cls, settings: TrainingSettings, bundle: Any, classifier: nn.Module | None,
                   splits: dict[str, Any]) -> "Trainer":
        """Build the networks for ``bundle`` (its input size and channels) and the trainer.
        ``splits``: name -> object with ``images`` (N, C, H, W) uint8 and ``labels`` (N,)."""
        raise NotImplementedError(f"{cls.name} cannot be trained into a bundle")

    def validate_explainer(self, classifier: nn.Module) -> dict[str, float]:
        """After training: the explainer on validation images, when ``validate`` scored only
        the networks (merged into bundle.yaml's validation record)."""
        return {}

    def test(self, classifier: nn.Module, images: torch.Tensor,
             on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """The trained explainer on the test split (``explainers.validity.evaluate_explainer``)."""
        raise NotImplementedError

    def bundle_parameters(self) -> dict[str, Any]:
        """bundle.yaml ``explainers.<name>.parameters``: architecture, network settings and
        the explainer's parameters (its constructor reads them)."""
        raise NotImplementedError

    def bundle_training(self) -> dict[str, Any]:
        """What bundle.yaml's training record says beyond the common fields."""
        return {}


class AdversarialTrainer(Trainer):
    """What the GAN methods share (sagen, exaggeration, medxgan): a generator and a
    critic, each with its Adam (``learning_rate``, ``discriminator_learning_rate``),
    trained against ``classifier``, which stays frozen for the whole fit."""

    def __init__(self, settings: TrainingSettings, generator: nn.Module, classifier: nn.Module,
                 train_images: torch.Tensor, val_images: torch.Tensor, *, discriminator: nn.Module | None = None):
        super().__init__(settings, train_images, val_images)
        # Built after set_determinism: a default critic's initial weights derive from the seed.
        self.discriminator = discriminator if discriminator is not None else self.default_discriminator(generator)
        self.generator = generator.to(self.device)
        self.discriminator.to(self.device)
        self.classifier = classifier.to(self.device)
        self.opt_g = adam(generator, settings.learning_rate, settings.betas)
        self.opt_d = adam(self.discriminator, getattr(settings, "discriminator_learning_rate"), settings.betas)

    @abstractmethod
    def default_discriminator(self, generator: nn.Module) -> nn.Module:
        """The critic to train when none is given."""

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def parts(self) -> dict[str, Any]:
        return {"generator": self.generator, "discriminator": self.discriminator, "opt_g": self.opt_g,
                "opt_d": self.opt_d}

    def frozen(self) -> ContextManager[Any]:
        return frozen(self.classifier)


def bundle_trainers() -> dict[str, type[Trainer]]:
    """Every explainer's trainer declaration, by method id: the ``Trainer`` subclasses
    with a ``for_bundle`` in the modules ``explainers/train_<method>.py`` (found by name,
    so a new method's trainer needs no registration)."""
    import importlib
    import pkgutil

    import explainers

    found: dict[str, type[Trainer]] = {}
    for module in pkgutil.iter_modules(explainers.__path__):
        if module.name.startswith("train_"):
            loaded = importlib.import_module(f"explainers.{module.name}")
            for value in vars(loaded).values():
                if (isinstance(value, type) and issubclass(value, Trainer) and value.__module__ == loaded.__name__
                        and value.for_bundle.__func__ is not Trainer.for_bundle.__func__):
                    found[value.name] = value
    return dict(sorted(found.items()))


class RunningMeans:
    """Means weighted by batch size, per key (a key counts only the batches that report it)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float], n: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
            self.counts[k] = self.counts.get(k, 0) + n

    def means(self) -> dict[str, float]:
        return {k: v / max(self.counts[k], 1) for k, v in self.sums.items()}


def write_log(rows: list[dict[str, float]], path: Path) -> None:
    """The per-epoch log as CSV (epoch as an integer, NaN as empty, 6 decimals)."""
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: int(v) if k == "epoch" else ("" if math.isnan(v) else round(v, 6))
                             for k, v in row.items()})


def fit(trainer: Trainer, checkpoint_dir: Path, *, log_path: Path | None = None,
        on_step: Callable[[int, int, dict[str, float]], None] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainingResult:
    """Train ``trainer`` for its settings' epochs; leaves the best epoch's weights in its networks.

    Resumes from ``checkpoint_dir/last.ckpt`` when one is there (refused, ValueError,
    when it was written for another setup); after every epoch writes last.ckpt,
    best.ckpt (when the epoch is the best so far) and the CSV log (default
    ``checkpoint_dir/<name>_training_log.csv``: mean training losses, ``val_*``
    metrics, cumulative seconds). ``on_step(epoch, step, running means)`` and
    ``on_epoch(log row)`` report progress (epochs and steps 0- and 1-based).
    """
    started = time.perf_counter()
    checkpoints = EpochCheckpoints(checkpoint_dir, trainer.fingerprint(), trainer.parts(), trainer.best_parts)
    state = checkpoints.resume()
    log_path = log_path or checkpoint_dir / f"{trainer.name}_training_log.csv"
    elapsed_before = state.elapsed_s
    with trainer.frozen():
        for epoch in range(state.start_epoch, trainer.settings.epochs):
            trainer.train_mode()
            running = RunningMeans()
            for step, batch in enumerate(trainer.batches(epoch), start=1):
                values, n = trainer.step(batch)
                running.add(values, n)
                if on_step:
                    on_step(epoch, step, running.means())
            validation = trainer.validate()
            state.log.append({"epoch": float(epoch), **running.means(),
                              **{f"val_{k}": v for k, v in validation.items() if k != "n"},
                              "seconds": elapsed_before + time.perf_counter() - started})
            checkpoints.end_epoch(epoch, trainer.selection_key(validation), state)
            write_log(state.log, log_path)
            if on_epoch:
                on_epoch(state.log[-1])
        checkpoints.load_best()
        trainer.eval_mode()
        validation = trainer.validate()
    return TrainingResult(best_epoch=state.best_epoch, validation=validation, log=state.log,
                          wall_time_s=state.elapsed_s)


def settings_fields(settings_class: type[TrainingSettings]) -> list[tuple[str, Any, Any, str]]:
    """(option name, type, default, help) for every command-line setting of a method:
    plain fields, and one level of nested dataclasses as ``<field>_<sub-field>``
    (e.g. ``weights_proximity``). Tuples and ``from_bundle`` fields are not options."""
    out = []
    hints = get_type_hints(settings_class)
    for f in fields(settings_class):
        if not f.metadata.get("cli", True) or getattr(hints[f.name], "__origin__", None) is tuple:
            continue
        default = f.default if f.default_factory is MISSING else f.default_factory()
        if is_dataclass(default):
            sub_hints = get_type_hints(type(default))
            for sub in fields(default):
                out.append((f"{f.name}_{sub.name}", sub_hints[sub.name], getattr(default, sub.name),
                            sub.metadata.get("help", f"{f.name}: {sub.name}")))
        else:
            out.append((f.name, hints[f.name], default, f.metadata.get("help", "")))
    return out


def settings_from_options(settings_class: type[TrainingSettings], options: dict[str, Any],
                          **fixed: Any) -> TrainingSettings:
    """Settings from ``settings_fields`` option values (nested ones reassembled) plus ``fixed``."""
    hints = get_type_hints(settings_class)
    values: dict[str, Any] = dict(fixed)
    for f in fields(settings_class):
        if f.name in fixed:
            continue
        if f.name in options:
            values[f.name] = options[f.name]
        elif f.default_factory is not MISSING and is_dataclass(hints[f.name]):
            nested = {sub.name: options[f"{f.name}_{sub.name}"] for sub in fields(hints[f.name])
                      if f"{f.name}_{sub.name}" in options}
            values[f.name] = hints[f.name](**nested)
    return settings_class(**values)
