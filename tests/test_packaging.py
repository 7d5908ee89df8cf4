"""nanoufo owns one import name, `nanoufo`: the top-level kernels/ folder imports as nanoufo.kernels, and nothing
the project ships or runs from shadows another distribution's package (Hugging Face's `kernels`, which
transformers imports, above all).
Test: python -m pytest -q tests/test_packaging.py
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_nanoufo_kernels_is_the_top_level_kernels_folder():
    import nanoufo.kernels.ppo_loss as module
    assert Path(module.__file__).resolve().parent == (ROOT / "kernels").resolve()


def test_the_installed_distribution_owns_no_top_level_name_but_nanoufo():
    owned = {name for name, dists in importlib.metadata.packages_distributions().items() if "nanoufo" in dists}
    if not owned:
        pytest.skip("nanoufo is not installed in this environment (make install does it)")
    assert owned == {"nanoufo"}


def test_an_installed_kernels_package_wins_over_the_folder_from_the_repository_root(tmp_path):
    # a stand-in for Hugging Face's kernels, on the path after the repository root (as site-packages is):
    # a kernels/__init__.py in the repository would shadow it, as it did for transformers >= 5.25
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("OWNER = 'installed'\n")
    code = "import sys, kernels; sys.path.index(''); print(kernels.OWNER)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "installed", done.stderr
