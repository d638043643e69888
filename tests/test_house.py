"""House rules a reader relies on: which module may import which, and who may end the process."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_sft.py", "train_rl.py", "eval.py"]
LIBRARY = sorted((ROOT / "atlas_min").glob("*.py"))


def imported_modules(path):
    """Every module name `path` imports, at any depth (lazy imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_no_library_module_imports_a_script(path):
    scripts = {name.removesuffix(".py") for name in SCRIPTS}
    assert not imported_modules(path) & scripts


@pytest.mark.parametrize("script", ["train_sft.py", "train_rl.py"])
def test_training_never_imports_evaluation(script):
    assert "atlas_min.evaluate" not in imported_modules(ROOT / script)


@pytest.mark.parametrize("path", ["eval.py", "atlas_min/evaluate.py"])
def test_the_eval_path_never_imports_the_toy_world(path):
    assert "atlas_min.toy" not in imported_modules(ROOT / path)


@pytest.mark.parametrize("path", [p for p in LIBRARY if p.name not in ("cli.py",)], ids=lambda p: p.name)
def test_library_modules_raise_and_never_exit_the_process(path):
    # cli.die is the one sys.exit, called by scripts and tools' main; a tool's `main` may exit too
    tree = ast.parse(path.read_text())
    mains = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "main"
             or isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
    in_main = {id(n) for m in mains for n in ast.walk(m)}
    exits = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "exit"
             and isinstance(n.value, ast.Name) and n.value.id == "sys" and id(n) not in in_main]
    assert not exits, f"{path.name} calls sys.exit outside main (line {exits[0].lineno})"
