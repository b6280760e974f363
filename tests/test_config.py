"""Configuration: config.yaml, the JSON schema and the dataclasses agree; errors name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from snakemake.utils import validate

from conftest import REPO
from forensic_vlm.config import Config, ConfigError, to_dict

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def load_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))


def test_config_yaml_is_valid_and_holds_the_defaults() -> None:
    raw = load_config()
    validate(raw, schema=str(SCHEMA))
    assert Config.from_dict(raw) == Config()
    assert raw["model"]["name_or_path"] == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert [c["ko"] for c in raw["classes"]] == ["관련 없음", "마약 대화 내역 사진", "마약 거래 장소", "마약 원본"]


def test_schema_and_dataclasses_have_the_same_keys_and_defaults() -> None:
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    defaults = to_dict(Config())
    assert set(schema["properties"]) == set(defaults)
    for section, spec in schema["properties"].items():
        assert "description" in spec, section
        if spec.get("type") == "object" and "properties" in spec:
            assert set(spec["properties"]) == set(defaults[section]), section
            for key, field in spec["properties"].items():
                assert "description" in field, f"{section}.{key}"
                default = field["default"]
                if section == "augment" and key == "per_image":
                    default = {int(k): v for k, v in default.items()}
                assert default == defaults[section][key], f"{section}.{key}"
        else:
            assert spec["default"] == defaults[section], section
    filled = {}
    validate(filled, schema=str(SCHEMA))  # an empty config gets every default from the schema
    assert Config.from_dict(filled) == Config()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"split": {"seed": "forty-two"}}, "seed"),
        ({"split": {"method": "random"}}, "method"),
        ({"manifest": {"on_bad_inputs": "report"}}, "on_bad_inputs"),
        ({"augmentation": {}}, "augmentation"),
        ({"demo": {"images_per_class": 1.5}}, "images_per_class"),
    ],
)
def test_wrong_type_or_unknown_key_is_named(change: dict, named: str) -> None:
    raw = load_config()
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(Exception, match=named):
        validate(raw, schema=str(SCHEMA))
    with pytest.raises(ConfigError, match=named):
        Config.from_dict(raw)


def test_inconsistent_settings_are_rejected_by_the_dataclasses() -> None:
    with pytest.raises(ConfigError, match=r"augment\.per_image"):
        Config.from_dict({"augment": {"per_image": {"9": 2}}})
    with pytest.raises(ConfigError, match="test_fraction"):
        Config.from_dict({"split": {"test_fraction": 1.0}})
    with pytest.raises(ConfigError, match="folder"):
        Config.from_dict({"classes": [{"id": 0, "folder": "1_x", "en": "a", "ko": "b"}]})


def test_workflow_stops_on_a_bad_config_key_naming_it(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(tmp_path),
            "-n",
            "--configfile",
            str(REPO / "config.yaml"),
            "--config",
            "split={'method': 'shuffle'}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "method" in result.stdout + result.stderr and "shuffle" in result.stdout + result.stderr


def test_configuration_reference_lists_every_key_of_the_schema() -> None:
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    table = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    keys = []
    for section, spec in schema["properties"].items():
        if spec.get("type") == "object" and "properties" in spec:
            keys += [f"{section}.{key}" for key in spec["properties"]]
        else:
            keys.append(section)
            keys += [f"{section}[].{key}" for key in spec.get("items", {}).get("properties", {})]
    listed = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert listed == set(keys)


def test_nested_command_line_values_get_their_schema_types() -> None:
    from forensic_vlm.config import coerce_strings

    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    # What Snakemake hands over for --config train="{learning_rate: 2e-3, epochs: 3}" report=...
    raw = {
        "train": {"learning_rate": "2e-3", "epochs": "3", "trainable": "[multi_modal_projector]"},
        "report": {"show_images": "false", "title": "42"},
        "augment": {"per_image": {"2": "4"}},
    }
    typed = coerce_strings(raw, schema)
    assert typed["train"] == {"learning_rate": 0.002, "epochs": 3, "trainable": ["multi_modal_projector"]}
    assert typed["report"] == {"show_images": False, "title": "42"}  # a string field stays a string
    assert typed["augment"]["per_image"] == {"2": 4}
    assert coerce_strings({"train": {"epochs": "many"}}, schema)["train"]["epochs"] == "many"  # left for validation


def test_configuration_reference_page_is_generated_from_the_schema(tmp_path) -> None:
    from forensic_vlm.config_reference import configuration_reference, main

    page = REPO / "docs" / "configuration.md"
    expected = configuration_reference(yaml.safe_load(SCHEMA.read_text(encoding="utf-8")))
    assert page.read_text(encoding="utf-8") == expected, (
        "docs/configuration.md is out of date: python -m forensic_vlm.config_reference "
        "workflow/schemas/config.schema.yaml docs/configuration.md"
    )
    for key in Config.__dataclass_fields__:  # every section and top-level key has its place
        assert f"`{key}" in expected, key
    main([str(SCHEMA), str(tmp_path / "out.md")])  # the command the page names writes the same page
    assert (tmp_path / "out.md").read_text(encoding="utf-8") == expected


def test_gradient_checkpointing_takes_auto_or_a_boolean_also_from_the_command_line() -> None:
    from forensic_vlm.config import coerce_strings

    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    for given, expected in (("true", True), ("false", False), ("auto", "auto")):
        typed = coerce_strings({"train": {"gradient_checkpointing": given}}, schema)
        assert Config.from_dict(typed).train.gradient_checkpointing == expected
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing: 'sometimes' is not one of"):
        Config.from_dict({"train": {"gradient_checkpointing": "sometimes"}})
