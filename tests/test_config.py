"""Configuration (config/): the shipped defaults, CLI overrides, and clear errors
that name the offending option."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config import DEFAULT_CONFIG, ConfigError, MedxplainConfig, load_config
from config.schema import PROJECT_ROOT


def _write(tmp_path: Path, text: str, name: str = "medxplain.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _defaults_with(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(changes)
    return _write(tmp_path, yaml.safe_dump(raw))


# -- defaults -------------------------------------------------------------------

def test_shipped_defaults_load_and_validate():
    cfg = load_config()
    assert isinstance(cfg, MedxplainConfig)
    assert cfg.explainers == ["gradcam", "ig", "occlusion"]
    assert cfg.batch_size == 8
    assert cfg.device == "auto"
    assert cfg.precision == "float32"
    assert cfg.explainer_parameters["ig"] == {"steps": 50}
    assert cfg.explainer_parameters["occlusion"] == {"window": 16, "stride": 8}
    assert cfg.outputs.overlay and cfg.outputs.report
    assert cfg.outputs.segmentation_top_fraction == 0.05
    assert cfg.trusted_torchscript == []
    assert cfg.bundle_path() == PROJECT_ROOT / "bundles" / "demo-pneumonia-v2"


def test_every_shipped_option_matches_the_schema_default_where_one_exists():
    """The YAML and the schema do not disagree silently (explainer_parameters is
    the one option the YAML deliberately fills)."""
    shipped = load_config().model_dump()
    schema = MedxplainConfig().model_dump()
    differing = {k for k in shipped if shipped[k] != schema[k]}
    assert differing <= {"explainer_parameters"}


def test_explicit_default_path_and_empty_file(tmp_path):
    assert load_config(DEFAULT_CONFIG) == load_config()
    empty = load_config(_write(tmp_path, ""))
    assert empty == MedxplainConfig()


def test_shipped_explainers_are_registered_with_valid_parameters():
    import explainers.baselines  # noqa: F401
    from explainers.base import create

    cfg = load_config()
    for name in cfg.explainers:
        kwargs = dict(cfg.explainer_parameters.get(name, {}))
        if name == "gradcam":
            kwargs["cam_layer"] = "class_layers.relu"  # comes from the bundle
        assert create(name, **kwargs).name == name


def test_relative_and_absolute_bundle_paths(tmp_path):
    assert load_config(overrides={"bundle": "bundles/x"}).bundle_path() == PROJECT_ROOT / "bundles" / "x"
    assert load_config(overrides={"bundle": str(tmp_path)}).bundle_path() == tmp_path


# -- overrides ------------------------------------------------------------------

def test_overrides_apply():
    cfg = load_config(overrides={"batch_size": 2, "explainers": ["ig"], "device": "cpu"})
    assert cfg.batch_size == 2
    assert cfg.explainers == ["ig"]
    assert cfg.device == "cpu"
    # untouched options keep their values
    assert cfg.explainer_parameters["ig"] == {"steps": 50}


def test_none_overrides_are_ignored():
    cfg = load_config(overrides={"batch_size": None, "explainers": None, "device": None, "bundle": None})
    assert cfg == load_config()


def test_overrides_apply_on_top_of_a_given_file(tmp_path):
    path = _defaults_with(tmp_path, batch_size=4, precision="bfloat16")
    cfg = load_config(path, overrides={"batch_size": 16})
    assert cfg.batch_size == 16
    assert cfg.precision == "bfloat16"


def test_invalid_override_is_reported_like_an_invalid_file():
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(overrides={"batch_size": 0})


# -- errors name the option ----------------------------------------------------

@pytest.mark.parametrize("changes,option", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 100000}, "batch_size"),
    ({"batch_size": "eight"}, "batch_size"),
    ({"device": "tpu"}, "device"),
    ({"precision": "int8"}, "precision"),
    ({"explainers": ["ig", "gradcam", "ig"]}, "explainers"),
    ({"explainers": []}, "explainers"),
    ({"max_pixels": 0}, "max_pixels"),
    ({"outputs": {"segmentation_top_fraction": 1.5}}, "outputs.segmentation_top_fraction"),
    ({"outputs": {"overlay": True, "colour": "jet"}}, "outputs.colour"),
    ({"bundel": "bundles/demo-pneumonia"}, "bundel"),
])
def test_invalid_values_raise_config_error_naming_the_option(tmp_path, changes, option):
    path = _defaults_with(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert option in message, message
    assert str(path) in message  # and the file it came from


def test_duplicate_explainers_say_so(tmp_path):
    with pytest.raises(ConfigError, match="twice"):
        load_config(_defaults_with(tmp_path, explainers=["ig", "ig"]))


def test_unknown_top_level_key_is_not_permitted(tmp_path):
    with pytest.raises(ConfigError, match=r"batchsize: Extra inputs are not permitted"):
        load_config(_write(tmp_path, "batchsize: 4\n"))


@pytest.mark.parametrize("text", ["- gradcam\n- ig\n", "just a string\n", "42\n"],
                         ids=["list", "string", "number"])
def test_non_mapping_yaml_is_refused(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, text))


def test_invalid_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "batch_size: [8\n"))


def test_unreadable_path_is_refused(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config") as info:
        load_config(missing)
    assert "nope.yaml" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path)  # a folder, not a file


def test_non_utf8_file_is_refused_cleanly(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\xe9glages\nbatch_size: 4\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml"):
        load_config(path)
