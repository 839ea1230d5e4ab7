"""Every Python snippet in the README runs as written."""

import pathlib
import re

import pytest

README = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
SNIPPETS = re.findall(r'```python\n(.*?)```', README, flags=re.DOTALL)


def test_readme_has_snippets():
    assert SNIPPETS


@pytest.mark.parametrize('index', range(len(SNIPPETS)))
def test_snippet_runs(index):
    exec(compile(SNIPPETS[index], f'README.md snippet {index}', 'exec'), {'__name__': 'readme'})
