"""Builds the wheel with the MONAI Label app, the bundles and the sample configs inside the package
(``monai_ad/share/``), where ``monai_ad.resources`` finds them once installed; metadata is in setup.cfg."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHARED = ("apps", "bundles", "sample_configs")
# what a user's runs leave inside a clone's bundles and app: never shipped
LEFT_BY_RUNS = shutil.ignore_patterns("__pycache__", "*.pyc", "models", "model", "data", "eval", "logs", ".pytest_cache")


class BuildWithSharedFiles(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for name in SHARED:
            target = Path(self.build_lib) / "monai_ad" / "share" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(root / name, target, ignore=LEFT_BY_RUNS)  # links (the bundles' shared configs) copied as files


setup(cmdclass={"build_py": BuildWithSharedFiles})
