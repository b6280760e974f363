"""Per-rule conda environments parse and pin the same versions as pyproject.toml."""

from __future__ import annotations

import re
import tomllib

import yaml

from conftest import REPO


def pins(requirements: list[str]) -> dict[str, str]:
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", requirement.strip())
        assert match, f"not pinned exactly: {requirement}"
        found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def test_env_files_parse_and_agree_with_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = pins(project["dependencies"] + project["optional-dependencies"]["test"])
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files
    for env_file in env_files:
        env = yaml.safe_load(env_file.read_text())
        assert "conda-forge" in env["channels"]
        pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
        assert len(pip_lists) == 1, env_file.name
        for name, version in pins(pip_lists[0]).items():
            assert declared.get(name) == version, (
                f"{env_file.name}: {name}=={version} vs pyproject {declared.get(name)}"
            )


def test_every_rule_names_an_existing_env() -> None:
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        text = rules.read_text()
        for rule in re.findall(r"^rule (\w+):", text, re.M):
            block = text.split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
            match = re.search(r'conda:\s*\n\s*"([^"]+)"', block)
            assert match, f"rule {rule} has no conda env"
            assert (rules.parent / match.group(1)).resolve().is_file(), f"rule {rule}: {match.group(1)}"
