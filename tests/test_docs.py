"""The README and docs/ pages: flag tables generated from the parameter dataclasses, a short front door."""
import pytest

from pipelines import NAMES
from pipelines.docs import ROOT, page, render


@pytest.mark.parametrize("name", ("common", *NAMES))
def test_flag_tables_match_the_parameter_dataclasses(name):
    text = page(name).read_text()
    assert render(text, name) == text, "the flag table drifted from the dataclass: run python -m pipelines.docs"


def test_every_pipeline_has_its_page_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name in NAMES:
        assert (ROOT / "docs" / f"{name}.md").exists() and f"(docs/{name}.md)" in readme


def test_the_readme_is_a_front_door_not_a_notebook():
    assert len((ROOT / "README.md").read_text().splitlines()) < 200
