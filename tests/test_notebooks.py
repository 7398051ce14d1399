"""The notebooks: stored with the outputs of a small run (readable without running them), no
links to unconfirmed addresses, an install cell that never fails, and they still run top to
bottom (the execution is slow: ``pytest -m slow``, as CI does).

Refresh the stored outputs after changing a notebook: ``python notebooks/execute.py``.
"""

import base64
import json
import re
from pathlib import Path

import pytest
from scripts import load_script

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NAMES = [p.name for p in NOTEBOOKS]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def outputs(path: Path) -> list[dict]:
    return [o for c in cells(path) if c["cell_type"] == "code" for o in c["outputs"]]


def printed(outs: list[dict]) -> str:
    return "".join("".join(o.get("text", "")) for o in outs if o["output_type"] == "stream")


def test_the_notebooks_exist():
    assert NAMES == [
        "01_quickstart.ipynb",
        "02_diagnosing_explosions.ipynb",
        "03_choosing_a_clipper.ipynb",
        "04_text_lm.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_links_only_to_confirmed_addresses(path):
    """No Colab badge or repository address that nobody has confirmed exists."""
    text = path.read_text()
    assert "colab.research.google.com" not in text
    assert "github.com/gradsafe" not in text
    assert "git+https://" not in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_install_cell_installs_from_the_checkout_or_says_how(path):
    install = source(cells(path)[1])
    assert 'importlib.util.find_spec("gradsafe") is None' in install
    assert '(d / "gradsafe" / "__init__.py").is_file()' in install  # finds the checkout
    assert "check=False" in install and "check=True" not in install  # never fails the cell
    assert 'pip install -e ".[examples]"' in install  # says how, when it cannot install


def test_install_cell_outside_a_checkout_prints_how_and_does_not_fail(
    tmp_path, monkeypatch, capsys
):
    """The install cell where gradsafe is not importable and no checkout is around."""
    install = source(cells(NOTEBOOKS[0])[1])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args, **kwargs: None)
    ran = []
    monkeypatch.setattr("subprocess.run", lambda *args, **kwargs: ran.append(args))
    exec(compile(install, "install cell", "exec"), {})  # must not raise
    assert ran == []  # nothing to install from
    said = capsys.readouterr().out
    assert "not on a package index yet" in said and 'pip install -e ".[examples]"' in said
    assert "gradsafe importable: False" in said


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_is_stored_with_outputs_of_a_small_run(path):
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code), "run notebooks/execute.py"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "outputs from one top-to-bottom run"
    outs = outputs(path)
    assert not [o for o in outs if o["output_type"] == "error"]
    text = printed(outs)
    assert "small run: True" in text and "Traceback" not in text
    images = [o["data"]["image/png"] for o in outs if "image/png" in o.get("data", {})]
    assert images, "no plot stored"
    assert all(base64.b64decode(image)[:8] == PNG_MAGIC for image in images)


def test_text_lm_notebook_shows_the_computed_verdict():
    text = printed(outputs(NOTEBOOKS[3]))
    assert re.search(r"^(STABILIZE HELPED|STABILIZE HURT|NO CLEAR DIFFERENCE): ", text, re.M)
    assert "byte-frequency baseline:" in text


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    runner = load_script(path.parent / "execute.py", "execute_notebooks")
    nb = runner.execute(path, cwd=tmp_path, timeout=300)  # raises on the first failing cell
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    assert "small run: True" in text
    assert "Traceback" not in text
    assert any("image/png" in o.get("data", {}) for o in outs)
