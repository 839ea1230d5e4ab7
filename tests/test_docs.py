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


@pytest.mark.parametrize(
    'page, index, code',
    SNIPPETS,
    ids=[f'{page.relative_to(ROOT)}:{index}' for page, index, _ in SNIPPETS],
)
def test_snippet_runs(page, index, code):
    name = f'{page.relative_to(ROOT)} snippet {index}'
    exec(compile(code, name, 'exec'), {'__name__': 'docs'})
