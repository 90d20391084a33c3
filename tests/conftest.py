import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
# Overrides swapping the quickstart's tasks for MultiMNIST left/right: one input batch feeds
# both, so representation-mode weightings apply.
MULTI_MNIST = ["~tasks.mnist", "~tasks.digits", "tasks.left.name=multi_mnist_left", "tasks.right.name=multi_mnist_right"]


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch):
    # Each test chooses its W&B mode in the config; an outer WANDB_MODE would override it.
    monkeypatch.delenv("WANDB_MODE", raising=False)


def quick(output_dir, epochs=1, steps=3, *extra):
    """Overrides that make the quickstart a few-second run without W&B."""
    return [
        f"output_dir={output_dir}",
        f"trainer.epochs={epochs}",
        f"trainer.steps_per_epoch={steps}",
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        *extra,
    ]


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny models: as fast on one thread, and two threads stall badly when
    another process holds one of the two cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


def pytest_configure(config):
    os.environ.setdefault("WANDB_SILENT", "true")


def roundtrip(module, fresh):
    """``fresh`` with ``module``'s state, through a real save/load as a checkpoint does."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def write_fashion_tree(root: Path, n: int = 40) -> None:
    """Fashion-MNIST's four gzipped IDX files with ``n`` random images each (labels 0-9 in turn)."""
    import gzip
    import struct

    import torch

    from tasks.fashion_mnist import FILES

    generator = torch.Generator().manual_seed(0)
    for key, stem in FILES.items():
        if key.endswith("images"):
            data = struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + torch.randint(0, 256, (n * 28 * 28,), generator=generator, dtype=torch.uint8).numpy().tobytes()
        else:
            data = struct.pack(">HBBI", 0, 8, 1, n) + (torch.arange(n) % 10).to(torch.uint8).numpy().tobytes()
        with gzip.open(root / f"{stem}.gz", "wb") as f:
            f.write(data)


def write_data_noun(path: Path, head: str = "", n: int = 200) -> Path:
    """A WordNet ``data.noun`` with ``head``'s lines and then ``n`` one-word synsets spread over
    the 26 lexicographer categories (03-28), each with its own definition."""
    path.write_text(head + "".join(f"0020{i:04d} {3 + i % 26:02d} n 01 w{i} 0 000 | definition number {i}\n" for i in range(n)))
    return path
