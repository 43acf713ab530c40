"""Packaging: the wheel installs everything under ``actsparse`` (nothing generic in site-packages), and every
package folder of the repository is in it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile

import pytest

from tests.helpers import ROOT


def _declared() -> dict[str, str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = cfg["package-dir"]
    declared = {}
    for pkg in cfg["packages"]:
        root = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len)
        declared[pkg] = "/".join([dirs[root], *pkg[len(root):].split(".")[1:]])
    return declared


def test_every_package_folder_is_declared():
    declared = set(_declared().values())
    folders = {str(p.parent.relative_to(ROOT)) for top in set(_declared().values()) if "/" not in top
               for p in (ROOT / top).rglob("__init__.py")}
    assert folders == declared, folders ^ declared


@pytest.mark.slow
def test_the_wheel_installs_only_actsparse(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("actsparse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"actsparse", f"{wheel.name.split('-py')[0]}.dist-info"}
    for module in ("actsparse/core/format.py", "actsparse/pipeline/collect.py", "actsparse/analyze/curves/compute.py",
                   "actsparse/queries/sparsity_curve.sql", "actsparse/share/verify.py", "actsparse/cli/app.py",
                   "actsparse/__init__.py", "actsparse/demo.py"):
        assert module in names, module
