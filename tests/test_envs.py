"""Per-rule conda environments: they parse, pin what pyproject.toml pins, and provide every
third-party module their rule's script can import (through the package, transitively)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = REPO / "src" / "forensic_vlm"
RULES = REPO / "workflow" / "rules"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str]:
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", requirement.strip())
        assert match, f"not pinned exactly: {requirement}"
        found[normalized(match.group(1))] = match.group(2)
    return found


def env_pins(env_file: Path) -> dict[str, str]:
    env = yaml.safe_load(env_file.read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip_lists) == 1, env_file.name
    return pins(pip_lists[0])


def rule_environments() -> dict[str, tuple[Path, Path]]:
    """rule name -> (its conda env file, its script), as the .smk files declare them; a rule made
    with ``use rule A as B`` has A's env and script unless it names its own."""
    declared: dict[str, dict[str, Path]] = {}
    parents: dict[str, str] = {}
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        blocks = re.split(r"^(?=rule \w+:|use rule \w+ as \w+)", text, flags=re.M)
        for block in blocks:
            header = re.match(r"rule (\w+):|use rule (\w+) as (\w+)", block)
            if not header:
                continue
            name = header.group(1) or header.group(3)
            if header.group(2):
                parents[name] = header.group(2)
            found = {}
            for directive in ("conda", "script"):
                match = re.search(rf"^\s+{directive}:\s*\n\s+\"([^\"]+)\"", block, re.M)
                if match:
                    found[directive] = (smk.parent / match.group(1)).resolve()
            declared[name] = found

    def inherited(name: str) -> dict[str, Path]:  # a rule made from a rule made with use rule
        return {**(inherited(parents[name]) if name in parents else {}), **declared.get(name, {})}

    rules = {}
    for name in declared:
        merged = inherited(name)
        if name != "all":
            assert set(merged) == {"conda", "script"}, f"rule {name} lacks { ({'conda', 'script'} - set(merged)) }"
            rules[name] = (merged["conda"], merged["script"])
    return rules


def imported_modules(source: Path) -> set[str]:
    """Every module a file can import, wherever the import stands (lazy imports in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from forensic_vlm import x` may name a module of the package
            names.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "forensic_vlm")
    return names


def third_party_imports(script: Path) -> dict[str, str]:
    """Top-level third-party module -> the package file (or script) that imports it, following
    every forensic_vlm module the script reaches."""
    found: dict[str, str] = {}
    todo, seen = [script], set()
    while todo:
        source = todo.pop()
        if source in seen:
            continue
        seen.add(source)
        for module in imported_modules(source):
            top = module.split(".")[0]
            if top == "forensic_vlm":
                parts = module.split(".")[1:]
                path = PACKAGE.joinpath(*parts).with_suffix(".py") if parts else PACKAGE / "__init__.py"
                if path.exists():
                    todo.append(path)
            elif top not in sys.stdlib_module_names and top not in ("_package", "__future__"):
                found.setdefault(top, source.name)
    return found


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def speed_extra() -> dict[str, str]:
    return pins(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["speed"])


def distribution_of(module: str) -> str:
    """The distribution that provides ``module``; the speed extra's GPU-only ones by name, since
    they are not installed where the tests run."""
    distributions = installed_modules().get(module)
    if not distributions and normalized(module) in speed_extra():
        return normalized(module)
    assert distributions, f"no installed distribution provides the module {module}"
    return normalized(distributions[0])


def missing_from_env(env_file: Path, script: Path) -> list[str]:
    """What the script can import that the env does not list, as 'module (distribution, imported by file)'."""
    listed = set(env_pins(env_file))
    return [
        f"{module} ({distribution_of(module)}, imported by {where})"
        for module, where in sorted(third_party_imports(script).items())
        if distribution_of(module) not in listed
    ]


def test_env_files_parse_and_agree_with_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = pins(project["dependencies"] + extras["test"] + extras["speed"] + extras["evidence"])
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files
    for env_file in env_files:
        assert "conda-forge" in yaml.safe_load(env_file.read_text())["channels"]
        for name, version in env_pins(env_file).items():
            assert declared.get(name) == version, (
                f"{env_file.name}: {name}=={version} vs pyproject {declared.get(name)}"
            )


def test_every_rule_names_an_existing_env_and_script() -> None:
    rules = rule_environments()
    assert {"manifest", "train", "evaluate_zeroshot", "evaluate_finetuned", "classify", "report"} <= set(rules)
    for rule, (env, script) in rules.items():
        assert env.is_file(), f"rule {rule}: {env}"
        assert script.is_file(), f"rule {rule}: {script}"


@pytest.mark.parametrize("rule", sorted(rule_environments()))
def test_each_rules_env_provides_what_its_script_imports(rule: str) -> None:
    env, script = rule_environments()[rule]
    missing = missing_from_env(env, script)
    assert not missing, f"rule {rule} runs in envs/{env.name}, which lacks: {', '.join(missing)}"


def test_the_package_declares_what_it_imports() -> None:
    """pyproject.toml lists every third-party distribution the package imports directly."""
    declared = set(pins(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]))
    declared |= set(speed_extra())  # imported only on a GPU, when the config asks for them
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared |= set(pins(extras["evidence"]))  # imported only for a container input
    declared |= set(pins(extras["review"]))  # imported only by forensic-vlm review serve
    imported = {distribution_of(m) for p in PACKAGE.glob("*.py") for m in third_party_imports(p)}
    assert imported <= declared, sorted(imported - declared)


def test_a_removed_dependency_is_found(tmp_path: Path) -> None:
    """The check can fail: classify's env without imagehash (which the manifest's checks use)."""
    env, script = rule_environments()["classify"]
    text = env.read_text()
    assert "imagehash==" in text
    stripped = tmp_path / env.name
    stripped.write_text("\n".join(line for line in text.splitlines() if "imagehash==" not in line))
    assert missing_from_env(env, script) == []
    assert missing_from_env(stripped, script) == ["imagehash (imagehash, imported by inspection.py)"]
