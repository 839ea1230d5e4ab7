"""Every Python snippet of the README and of the docs site runs as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').rglob('*.md'))]
SNIPPETS = [
    (page, index, code)
    for page in PAGES
    for index, code in enumerate(
        re.findall(r'```python\n(.*?)```', page.read_text(), flags=re.DOTALL)
    )
]


def test_readme_and_guides_have_snippets():
    pages = {page.name for page, _, _ in SNIPPETS}
    assert {'README.md', 'nnx.md', 'equinox.md', 'plain-jax.md', 'accumulation.md'} <= pages


def test_readme_stays_a_front_door():
    assert len((ROOT / 'README.md').read_text().splitlines()) <= 200


def test_the_study_page_shows_every_committed_cell():
    """A cell committed under examples/study_results/ and left off the study page would be a
    result nobody reads; the page includes each cell's own table."""
    page = (ROOT / 'docs' / 'results' / 'study.md').read_text()
    cells = sorted((ROOT / 'examples' / 'study_results').glob('*/study.md'))
    assert cells
    missing = [c.parent.name for c in cells if f'--8<-- "{c.relative_to(ROOT)}"' not in page]
    assert not missing, f'docs/results/study.md does not include {missing}'


@pytest.mark.parametrize(
    'page, index, code',
    SNIPPETS,
    ids=[f'{page.relative_to(ROOT)}:{index}' for page, index, _ in SNIPPETS],
)
def test_snippet_runs(page, index, code):
    name = f'{page.relative_to(ROOT)} snippet {index}'
    exec(compile(code, name, 'exec'), {'__name__': 'docs'})
