"""The package list, derived from the tree (metadata and dependencies are in setup.cfg).

`modeling/` and `model_cards/` sit at the top of the repository (a Hub repo carries the modeling files as they are)
and install as `hf_moe.modeling` and `hf_moe.model_cards`; every other package is found under `hf_moe/`.
"""

from setuptools import find_packages, setup

TOP_LEVEL_FOLDERS = {"hf_moe.modeling": "modeling", "hf_moe.model_cards": "model_cards"}


def packages_under(package: str, folder: str) -> list[str]:
    """`package` and its subpackages, found in `folder` (every folder with an `__init__.py`)."""
    return [package, *(f"{package}.{name}" for name in find_packages(where=folder))]


setup(
    packages=[*find_packages(include=["hf_moe", "hf_moe.*"]),
              *(name for package, folder in TOP_LEVEL_FOLDERS.items() for name in packages_under(package, folder))],
    package_dir={"hf_moe": "hf_moe", **TOP_LEVEL_FOLDERS},
    # Every non-Python file a package folder holds (the card template, and whatever such files come later).
    package_data={"": ["*.md", "*.json", "*.jinja", "*.txt"]},
)
