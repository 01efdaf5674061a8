import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PRIVTUNE_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()  # tests run Snakemake elsewhere


@pytest.fixture
def float64():
    """torch's default dtype float64 for one test, restored afterwards (never leaks into other tests)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Random-init tiny BERT and Llama folders (byte tokenizer, offline): ``root/bert``, ``root/llama``."""
    from privtune import models

    root = tmp_path_factory.mktemp("models")
    for arch in ("bert", "llama"):
        models.prepare_model(f"tiny-{arch}", {"source": "tiny", "arch": arch}, root / arch, root / "wheels")
    return root


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA / "glue").exists():
        pytest.skip(f"no data mirror at {DATA} (set PRIVTUNE_DATA_DIR)")
    return DATA


def copy_workflow(dest: Path) -> Path:
    """A scratch copy of the workflow (Snakefile, rules, configs) to run Snakemake in."""
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("workflow", "config", "envs", "profiles"):
        shutil.copytree(ROOT / name, dest / name)
    return dest
