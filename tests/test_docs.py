"""The README and docs stay true to the code: config reference, quick-start commands, CI entry."""

from pathlib import Path

from gogepo_ray.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_docs_config_reference_is_current():
    text = (ROOT / "docs" / "config.md").read_text()
    block = text.split("<!-- config-reference:start -->\n", 1)[1].split(
        "<!-- config-reference:end -->", 1
    )[0]
    assert block.strip() == reference_markdown().strip(), (
        "regenerate with: python -m gogepo_ray.config"
    )


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    assert "make train" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_quick_start():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
