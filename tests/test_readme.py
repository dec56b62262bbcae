"""The README's code runs as written: documentation that matches the code."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README should show how to compose fnlm's pure functions"
    session: dict = {}  # the blocks read as one session: later ones use earlier names
    for block in blocks:
        exec(compile(block, str(README), "exec"), session)
