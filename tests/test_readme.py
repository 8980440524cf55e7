import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's API example is real code: run it."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], "README-example", "exec"), ns)
    result = ns["result"]
    assert result.method == "fine-prune" and result.after.clean_acc > 0.8
    exec(compile(blocks[1], "README-save", "exec"), ns)
    assert (tmp_path / "clean.safetensors").exists()


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in ci
    assert ".venv/bin/python -m pytest -q" in README.read_text()
