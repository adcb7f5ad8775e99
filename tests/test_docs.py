"""The README and docs stay true to the code: generated references, the docs site's build,
quick-start commands, CI entry."""

import os
import subprocess
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from gogepo_ray import config as config_module
from gogepo_ray.config import reference_markdown
from gogepo_ray.docgen import cli_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_docs_config_reference_is_current():
    text = (ROOT / "docs" / "config.md").read_text()
    block = text.split("<!-- config-reference:start -->\n", 1)[1].split(
        "<!-- config-reference:end -->", 1
    )[0]
    assert block.strip() == reference_markdown().strip(), (
        "regenerate with: python -m gogepo_ray.config"
    )


def test_docs_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_markdown(), (
        "docs/cli.md is stale; regenerate with: python -m gogepo_ray.docgen > docs/cli.md"
    )


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_every_config_field_has_a_description():
    """Every field of every config model (the models of gogepo_ray/config.py and the
    sections they hold, at any depth) has an attribute docstring: the config reference is
    generated from them."""
    models = [
        obj
        for obj in vars(config_module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == "gogepo_ray.config"
    ]
    missing, seen = [], set()
    while models:
        model = models.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{model.__name__}.{name}")
            models += _models_in(field.annotation)
    assert config_module.Config in seen and config_module.RunConfig in seen
    assert not missing, (
        f"config fields without a description: {', '.join(sorted(missing))}; write a "
        'one-line """docstring""" under each in gogepo_ray/config.py'
    )


def test_mkdocs_build_strict(tmp_path):
    """The docs site builds with every page in the nav and every link resolving."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "cli" / "index.html").is_file()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    assert "make train" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_quick_start():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it to 200 and link docs/"
    first = next(i for i, line in enumerate(lines) if line.startswith("```"))
    block = lines[first + 1 : first + 3]
    assert block[0].startswith("make train") and block[1].startswith("make test"), block
    for target in ("train:", "test:"):  # the Makefile has both targets
        assert target in (ROOT / "Makefile").read_text()
