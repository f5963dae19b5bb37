"""The repository's top-level names never shadow an installed package (issue 19: a ``kernels/__init__.py``
made ``import transformers`` fail on a machine with Hugging Face's ``kernels`` package installed)."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Import names a dependency, or a package a train_glue.py user plausibly has, might also use.
NEIGHBOURS = ("transformers", "torchvision", "sklearn", "matplotlib", "tokenizers", "safetensors", "yaml", "numpy")
PROJECT = ("kd_core", "engine", "checkpoints", "runfolder", "stages", "multirun", "report", "models", "distillers")


def top_level_names() -> set[str]:
    """Every importable name the repository root puts on ``sys.path``: modules and regular packages."""
    names = {p.stem for p in ROOT.glob("*.py")}
    names |= {p.parent.name for p in ROOT.glob("*/__init__.py")}
    return names


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose ``sys.path`` starts with the repository root, as a script's does."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)


def test_kernels_folder_is_no_package():
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py makes the folder a regular package that shadows the installed 'kernels' package"


def test_no_top_level_name_is_an_installed_distributions_import_name():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in top_level_names() if name in installed}
    assert not clashes, f"repository names that shadow installed packages: {clashes}"


def test_transformers_imports_with_the_repository_first_on_the_path():
    pytest.importorskip("transformers")
    proc = run_python("import transformers\nfrom transformers import BertModel\n"
                      "import importlib.util\nspec = importlib.util.find_spec('kernels')\n"
                      "print('kernels:', spec.origin if spec else None)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = proc.stdout.split("kernels:", 1)[1].strip()
    if "kernels" in importlib.metadata.packages_distributions():   # Hugging Face's package, when installed
        assert origin != "None" and not origin.startswith(str(ROOT)), origin


@pytest.mark.parametrize("order", ["project_first", "neighbours_first"])
def test_project_modules_and_neighbour_packages_import_in_either_order(order):
    neighbours = [name for name in NEIGHBOURS if importlib.util.find_spec(name) is not None]
    project = [f"import {name}" for name in PROJECT]
    others = [f"import {name}" for name in neighbours] + ["from transformers import BertModel"] * (
        "transformers" in neighbours)
    lines = project + others if order == "project_first" else others + project
    checks = [f"assert {name}.__file__.startswith({str(ROOT)!r}), {name}.__file__" for name in PROJECT]
    checks += [f"assert not {name}.__file__.startswith({str(ROOT)!r}), {name}.__file__" for name in neighbours]
    proc = run_python("\n".join(lines + checks))
    assert proc.returncode == 0, proc.stderr[-3000:]
