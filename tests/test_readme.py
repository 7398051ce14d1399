"""The README's Python examples run as written."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no Python example"
    with jax.numpy_dtype_promotion("standard"):  # Optax's Adam is not strict-promotion clean
        for block in blocks:
            exec(compile(block, str(README), "exec"), {})
