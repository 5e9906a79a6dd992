"""The import graph points one way: the layers contract in pyproject.toml, and no import that dodges it."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "similar_finder"
# Modules that import a heavy library at their top, so that importing them inside a function defers it.
HEAVY = {"pooling": "keras", "plots": "matplotlib"}
# The command line imports each command's module when that command runs: `--help` stays fast.
DEFERS_EVERY_COMMAND = {"cli"}


def test_the_layers_contract_is_kept():
    # In a process of its own: import-linter reconfigures logging, which other tests' caplog rely on.
    script = ("import sys\nfrom importlinter.cli import lint_imports\n"
              "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, "an import points up the layers written in pyproject.toml:\n" + done.stdout[-3000:]
    assert "1 kept, 0 broken" in done.stdout


def _own_function_level_imports():
    """``(importer, imported, line)`` for every import of a package module inside a function."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        importer = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package[:len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    names = [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
                    found.extend((importer, name, node.lineno) for name in names)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    found.extend((importer, n.removeprefix("similar_finder."), node.lineno)
                                 for n in names if n and n.startswith("similar_finder"))
    return found


def test_a_function_level_import_of_the_package_only_defers_a_heavy_library():
    dodging = [f"{importer}:{line} imports {imported}" for importer, imported, line in _own_function_level_imports()
               if importer not in DEFERS_EVERY_COMMAND and imported not in HEAVY]
    assert not dodging, "import these at the top of the module (a layer below), or move the code: " + \
        "; ".join(dodging)


def test_the_modules_called_heavy_do_load_a_heavy_library():
    script = "import importlib, sys\n" + "".join(
        f"importlib.import_module('similar_finder.{module}'); print('{module}', '{library}' in sys.modules)\n"
        for module, library in HEAVY.items())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert all(line.endswith("True") for line in done.stdout.split("\n") if line), done.stdout


def test_python_dash_m_run_all_loads_no_module_twice():
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "similar_finder.run_all", "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "run-all" in done.stdout, done.stderr[-2000:]
