"""The Python blocks of the README and the documentation run as written, and print what they
show.

A page's blocks run in order in one namespace (a later block may use an earlier one's names),
after ``import jax, jax.numpy as jnp, numpy as np, optax, gradsafe as gs``. The comment lines
that end a block are its printed output: the test compares them with what the block printed
(whitespace-insensitive), and a block that prints must show its output so.
"""

import contextlib
import io
import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PREAMBLE = "import jax, jax.numpy as jnp, numpy as np, optax, gradsafe as gs"


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    ]


def shown_output(block: str) -> str:
    """The comment lines that end the block, without their '# ' (the output it shows)."""
    lines = block.rstrip("\n").split("\n")
    shown: list[str] = []
    while lines and lines[-1].startswith("#"):
        shown.insert(0, lines.pop()[1:].strip())
    return " ".join(shown)


def normalized(text: str) -> str:
    return " ".join(text.split())


def test_shown_output_is_the_trailing_comments():
    block = "x = 1  # not output\n# not output either\nprint(x)\n# 1\n#  2\n"
    assert shown_output(block) == "1 2"
    assert shown_output("print(1)\n") == ""


PAGES_WITH_CODE = [page for page in PAGES if python_blocks(page)]


def test_the_readme_has_python():
    assert ROOT / "README.md" in PAGES_WITH_CODE


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_and_print_what_they_show(page):
    namespace: dict = {}
    exec(PREAMBLE, namespace)
    with jax.numpy_dtype_promotion("standard"):  # Optax's Adam is not strict-promotion clean
        for line, block in python_blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                exec(compile(block, where, "exec"), namespace)
            printed, shown = normalized(stdout.getvalue()), normalized(shown_output(block))
            assert printed == shown, f"{where}: the block prints\n{printed}\nbut shows\n{shown}"
