"""hf_moe as users get it: the sdist and the wheel built from the tracked files, the wheel installed (not editable)
into an environment where the checkout is not importable, and used there from the command line and the Auto classes.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from .conftest import save_tiny_dense

REPO = Path(__file__).resolve().parents[1]
# Folders installed as hf_moe packages (setup.py maps the two top-level ones under hf_moe).
PACKAGE_FOLDERS = {"hf_moe": "hf_moe", "hf_moe.modeling": "modeling", "hf_moe.model_cards": "model_cards"}


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the packaging test builds from the tracked files")
    return listed.stdout.splitlines()


def packages_in_tree(files: list[str]) -> set[str]:
    """Every folder with an `__init__.py` under the package folders, as the dotted name it installs under."""
    packages = set()
    for package, folder in PACKAGE_FOLDERS.items():
        for path in files:
            if path.startswith(f"{folder}/") and path.endswith("/__init__.py"):
                inner = path[len(folder) + 1:-len("/__init__.py")]
                packages.add(".".join(filter(None, [package, inner.replace("/", ".")])))
    return packages


def installed_path(path: str) -> str | None:
    """Where a tracked file of a package folder lands in the wheel (None when it is outside every package)."""
    for package, folder in sorted(PACKAGE_FOLDERS.items(), key=lambda item: -len(item[1])):
        if path.startswith(f"{folder}/") and "__pycache__" not in path:
            return package.replace(".", "/") + path[len(folder):]
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel path, tracked files): sdist from a copy of the tracked files, then the wheel from that sdist."""
    files = tracked_files()
    source = tmp_path_factory.mktemp("source")
    for path in files:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, source / path)
    dist = source / "dist"
    completed = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (wheel,) = dist.glob("hf_moe-*.whl")
    assert len(list(dist.glob("hf_moe-*.tar.gz"))) == 1
    return wheel, files


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    """A fresh venv with the wheel installed, seeing this environment's dependencies through a .pth line (which
    adds the folder without running the .pth files in it, so the editable install's finder stays out)."""
    wheel, _ = built
    env = tmp_path_factory.mktemp("env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    return env


def run_installed(env: Path, *command: str, cwd: Path) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, capture_output=True, text=True, cwd=cwd,
                               env={"PATH": f"{env / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                    "TRANSFORMERS_VERBOSITY": "error", "HOME": str(cwd)})
    assert completed.returncode == 0, f"{command}:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed


def test_the_wheel_holds_every_package_and_data_file_of_the_tree(built):
    wheel, files = built
    names = set(zipfile.ZipFile(wheel).namelist())
    wheel_packages = {name[:-len("/__init__.py")].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert wheel_packages == packages_in_tree(files)
    expected = {installed_path(path) for path in files} - {None}
    assert expected - names == set()
    assert "hf_moe/model_cards/model_card.md" in names


@pytest.mark.slow
def test_the_installed_wheel_imports_runs_the_cli_and_loads_its_folders(installed, tmp_path):
    env = installed
    # Every module of the installed package imports, from the installed files, with the dependencies satisfied.
    script = textwrap.dedent("""
        import importlib, importlib.metadata, json, pkgutil, sys
        from packaging.requirements import Requirement
        import hf_moe
        modules = sorted(info.name for info in pkgutil.walk_packages(hf_moe.__path__, "hf_moe."))
        for name in modules:
            importlib.import_module(name)
        unmet = [str(requirement) for requirement in map(Requirement, importlib.metadata.requires("hf_moe"))
                 if requirement.marker is None
                 and importlib.metadata.version(requirement.name) not in requirement.specifier]
        print(json.dumps({"file": hf_moe.__file__, "modules": modules, "unmet": unmet}))
    """)
    report = json.loads(run_installed(env, "python", "-c", script, cwd=tmp_path).stdout.splitlines()[-1])
    assert report["file"].startswith(str(env)), report["file"]
    assert len(report["modules"]) > 80 and "hf_moe.checkpoints.reading" in report["modules"]
    assert report["unmet"] == []

    version = run_installed(env, "hf-moe", "--version", cwd=tmp_path).stdout
    assert version.startswith("hf-moe 0.1.0 (transformers ")

    dense = save_tiny_dense(tmp_path / "dense")
    upcycled = run_installed(env, "hf-moe", "upcycle", str(dense), "moe", "--num-experts", "4", "--top-k", "2",
                             "--verify", "--json", cwd=tmp_path)
    verification = json.loads(upcycled.stdout)
    assert verification["identical_generations"] == verification["inputs"] > 0
    assert verification["max_abs_logit_difference"] < 1e-4
    run_installed(env, "hf-moe", "prune", "moe", "pruned", "--keep", "2", "--method", "frequency",
                  "--calibration_samples", "4", "--max_length", "32", cwd=tmp_path)
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["num_experts"] == 2

    load = textwrap.dedent("""
        import sys
        if sys.argv[1] == "blocked":
            sys.modules["hf_moe"] = None  # a user without hf_moe: the folder's remote code only
        else:
            import hf_moe
        import torch
        from transformers import AutoModelForCausalLM
        for folder in ("moe", "pruned"):
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=sys.argv[1] == "blocked")
            print(folder, type(model).__module__, model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1])
    """)
    with_hf_moe = run_installed(env, "python", "-c", load, "installed", cwd=tmp_path).stdout.splitlines()
    assert [line.split()[1].startswith("hf_moe.modeling") for line in with_hf_moe] == [True, True]
    remote = run_installed(env, "python", "-c", load, "blocked", cwd=tmp_path).stdout.splitlines()
    assert [line.split()[1].startswith("transformers_modules.") for line in remote] == [True, True]
