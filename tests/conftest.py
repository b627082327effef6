"""Shared fixtures. The repository root is the import root, as for the scripts."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def load_script():
    """load_script("train") -> scripts/train.py as a module (scripts are not a package), one module per name."""
    import importlib.util

    loaded = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
            loaded[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded[name])
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def synthetic_root(load_script, tmp_path_factory) -> Path:
    """The training script's own synthetic dataset, prepared with the fast path's cache; runs only read it."""
    from data.prepare import prepare_cityscapes
    from data.synthetic import generate_cityscapes

    root = generate_cityscapes(tmp_path_factory.mktemp("synthetic") / "cs", **load_script("train").SYNTHETIC)
    prepare_cityscapes(root, build_cache=True, progress=False)
    return root
