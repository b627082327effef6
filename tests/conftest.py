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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module runs (restored after): on a shared 2-core machine, two OpenMP threads
    wait on each other at every barrier and a 64x128 forward pass takes seconds instead of 0.2 s.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def run_eval(load_script):
    """run_eval(*argv) -> scripts/eval.py main's results, on the CPU, in this process."""
    from accelerate.state import AcceleratorState

    eval_script = load_script("eval")

    def run(*argv):
        AcceleratorState._reset_state(reset_partial_state=True)
        return eval_script.main(eval_script.get_args_parser().parse_args([*argv, "--cpu", "--num_workers", "0"]))

    return run


@pytest.fixture(scope="session")
def make_val_set():
    """make_val_set(base, **sizes) -> (root, checkpoint folder): a synthetic Cityscapes (generate_cityscapes(**sizes))
    with labelTrainIds prepared, and a saved random model whose predictions are varied."""
    import torch

    from data.prepare import prepare_cityscapes
    from data.synthetic import generate_cityscapes
    from modeling import HRNetFCNConfig, HRNetFCNForSemanticSegmentation

    def make(base: Path, **sizes) -> tuple[Path, Path]:
        root = generate_cityscapes(base / "cs", **sizes)
        prepare_cityscapes(root, progress=False)
        torch.manual_seed(0)
        model = HRNetFCNForSemanticSegmentation(HRNetFCNConfig())
        with torch.no_grad():  # a random head predicts one class; larger weights make the maps varied
            model.decode_head.conv_seg.weight.normal_(0, 1.0)
        model.save_pretrained(base / "ckpt")
        return root, base / "ckpt"

    return make
