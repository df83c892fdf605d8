"""The one training framework (explainers/training.py): every trainer declaration is
complete, a resumed run is bit-identical for the classifier too, explainer parameters
may change between a run and its resumption, and the command-line options come
from the method's settings."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from monai.networks.nets import DenseNet

from explainers.networks import BinaryClassifier
from explainers.train_classifier import ClassifierTrainer, ClassifierTrainingConfig
from explainers.train_gvr import GvrTrainer, GvrTrainingConfig
from explainers.training import Trainer, TrainingSettings, fit, settings_fields, settings_from_options
from pipeline.training.explainers import TRAINERS
from tests.generator_helpers import box_images


def test_every_trainer_declares_what_the_framework_needs():
    assert set(TRAINERS) == {"sagen", "exaggeration", "cia", "gvr", "medxgan"}
    for name, trainer in TRAINERS.items():
        assert issubclass(trainer, Trainer) and trainer.name == name
        assert issubclass(trainer.settings_class, TrainingSettings) and trainer.best_parts
        # The bundle path: every method builds itself for a bundle and says what bundle.yaml records.
        for hook in ("for_bundle", "test", "bundle_parameters"):
            assert getattr(trainer, hook) is not getattr(Trainer, hook), f"{name} lacks {hook}"


def test_options_come_from_the_settings_and_round_trip():
    for trainer in TRAINERS.values():
        options = {name: default for name, _, default, _ in settings_fields(trainer.settings_class)}
        assert {"epochs", "batch_size", "learning_rate", "seed", "device"} <= set(options)
        assert "threshold" not in options and "betas" not in options  # the bundle's / not an option
        assert settings_from_options(trainer.settings_class, options) == trainer.settings_class()
    sagen = {name for name, *_ in settings_fields(TRAINERS["sagen"].settings_class)}
    assert {"weights_proximity", "margin", "size", "width"} <= sagen
    changed = settings_from_options(TRAINERS["sagen"].settings_class, {"weights_proximity": 3.0, "epochs": 2})
    assert changed.weights.proximity == 3.0 and changed.epochs == 2


def test_every_explainer_parameter_is_a_training_option_with_the_explainers_default():
    """`medxplain train METHOD` must be able to write every setting the explainer takes
    (a shipped setting reproducible by one command), with the explainer's own default."""
    import inspect

    from explainers.base import available, explainer_class

    for name, trainer in TRAINERS.items():
        readers = [explainer_class(e) for e in available() if getattr(explainer_class(e), "bundle_section", None) == name]
        expected = {}
        for cls in readers:
            for klass in cls.__mro__:  # defaults over the hierarchy, as parameter_names reads the names
                init = klass.__dict__.get("__init__")
                if init is None or klass is object:
                    continue
                for key, p in inspect.signature(init).parameters.items():
                    if key in cls.parameter_names() and key not in expected:
                        expected[key] = p.default
        settings = trainer.settings_class()
        stored = settings.explainer_parameters()
        marked = [f for f in dataclasses.fields(settings) if f.metadata.get("explainer")]
        assert len(marked) == len(stored), f"{name}: two settings store under one bundle name"
        assert set(stored) == set(expected), f"{name}: {set(stored) ^ set(expected)}"
        assert stored == expected, name


def _classifier(seed: int = 0) -> BinaryClassifier:
    torch.manual_seed(seed)
    network = DenseNet(spatial_dims=2, in_channels=1, out_channels=1, init_features=4, growth_rate=4,
                       block_config=(2, 2))
    return BinaryClassifier(network, mean=0.5, std=0.25)


def test_classifier_training_resumes_bit_identically(tmp_path):
    train, train_labels = box_images(16, seed=0)
    val, val_labels = box_images(8, seed=1)

    def run(folder: str, on_epoch=None):
        settings = ClassifierTrainingConfig(epochs=2, batch_size=8)
        trainer = ClassifierTrainer(settings, _classifier(), train, train_labels, val, val_labels)
        return fit(trainer, tmp_path / folder, on_epoch=on_epoch)

    class Interrupted(Exception):
        pass

    def interrupt(row):
        raise Interrupted  # after the first epoch's checkpoint, as a killed run would stop

    with pytest.raises(Interrupted):
        run("a", on_epoch=interrupt)
    second = run("a")
    assert [r["epoch"] for r in second.log] == [0.0, 1.0]
    run("b")
    last_a = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["model"]
    last_b = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)  # resume == uninterrupted
    assert {"train_loss", "val_auroc", "val_accuracy", "seconds"} <= set(second.log[-1])


def test_explainer_parameters_may_change_on_resume_training_settings_may_not(tmp_path):
    from explainers.gvr import GvrAutoEncoder

    train, _ = box_images(8, seed=0)
    val, _ = box_images(4, seed=1)
    settings = GvrTrainingConfig(epochs=1, batch_size=8)

    def trainer(s: GvrTrainingConfig) -> GvrTrainer:
        torch.manual_seed(0)
        return GvrTrainer(s, GvrAutoEncoder(widths=(4, 8), latent_channels=2, size=None), train, val)

    fit(trainer(settings), tmp_path)
    again = fit(trainer(dataclasses.replace(settings, search_steps=7, similarity=0.5)), tmp_path)
    assert len(again.log) == 1  # finished: nothing retrained, the new search settings just apply
    with pytest.raises(ValueError, match="different setup"):
        fit(trainer(dataclasses.replace(settings, learning_rate=0.5)), tmp_path)
