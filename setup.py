"""Build hook: the wheel carries what the tool reads at run time from the top of the repository
(qlora_doctor/core/shipped.py): recipes with their data, matrix.yaml, matrix records and lockfiles, copied
into qlora_doctor/shipped/ of the build, so the repository keeps its layout and an installed wheel finds
them without a checkout. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("recipes", "matrix.yaml", "matrix-results", "lockfiles")  # = core/shipped.py SHIPPED_NAMES


class BuildPyWithShippedFiles(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        target = Path(self.build_lib) / "qlora_doctor" / "shipped"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in SHIPPED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=ignore)
            elif source.is_file():
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
