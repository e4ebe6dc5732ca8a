"""What installs: every mpqc package, and the kernels folder under a name no other project uses."""

import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_package_list_names_every_mpqc_package_and_the_kernels():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "mpqc").rglob("__init__.py")}
    assert set(config["packages"]) == found | {"mpqc_kernels"}
    assert config["package-dir"] == {"mpqc_kernels": "kernels"}


def test_kernels_import_as_mpqc_kernels_and_not_as_kernels(tmp_path):
    # From a folder outside the checkout, so only what is installed can be imported.
    code = ("import importlib.util, sys\n"
            "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels package is importable'\n"
            "import mpqc_kernels.int4_layout, mpqc_kernels.split_k, mpqc.backends.tensorrt.int4_conv_plugin_graph\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_no_benchmark_edits_the_import_path():
    for script in (ROOT / "benchmarks").glob("*.py"):
        assert "sys.path" not in script.read_text(), script.name
