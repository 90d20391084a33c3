"""The same code on CUDA: every weighting under bf16 autocast and channels_last, solvers on
the device of the gradients, and the engine's chunked Jacobian. Skipped without a GPU
(CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``."""

import json
import math

import pytest
import torch

from mtl.cli import main
from mtl.engine import jacobian
from mtl.weighting import WEIGHTINGS, GradientWeighting

from conftest import MULTI_MNIST, QUICKSTART, quick

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GRADIENT_METHODS = [n for n in WEIGHTINGS.names() if issubclass(WEIGHTINGS.get(n), GradientWeighting)]


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_trains_on_cuda_in_bf16_channels_last(name, tmp_path):
    cls = WEIGHTINGS.get(name)
    # MultiMNIST's two tasks share one input batch, so every mode is valid on them.
    extra = MULTI_MNIST + (["weighting.mode=representation"] if "representation" in getattr(cls, "modes", ()) else [])
    run = tmp_path / "run"
    args = quick(run, 2, 3, f"weighting.name={name}", "device=cuda", "trainer.precision=bf16", "trainer.channels_last=true", *extra)
    assert main(["train", QUICKSTART, *args]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["device"].startswith("cuda") and results["steps"] == 6
    assert all(math.isfinite(m["loss"]) for m in results["splits"]["test"].values())


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_aggregation_runs_on_the_gradients_device_and_matches_cpu(name):
    g = torch.Generator().manual_seed(0)
    J = torch.randn(5, 64, generator=g, dtype=torch.float64)
    J[1:] -= 0.5 * J[0]  # conflicts, so the solvers do real work
    on_cpu = WEIGHTINGS.get(name)([f"t{i}" for i in range(5)]).aggregate(J)
    on_gpu = WEIGHTINGS.get(name)([f"t{i}" for i in range(5)]).to("cuda").aggregate(J.cuda())
    for field in ("gradient", "weights"):
        a, b = getattr(on_cpu, field), getattr(on_gpu, field)
        if a is None or name == "graddrop":  # its random draws differ between devices
            continue
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 3])
def test_chunked_jacobian_on_cuda_equals_cpu(chunk):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 7))
    x = torch.randn(4, 3, 8, 8)
    expected = jacobian(net(x).pow(2).mean(dim=0), list(net.parameters()))
    net = net.cuda()
    J = jacobian(net(x.cuda()).pow(2).mean(dim=0), list(net.parameters()), chunk)
    torch.testing.assert_close(J.cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_staged_gramian_on_cuda_equals_jjt(precision):
    """G from the stages equals JJᵀ on CUDA, under bf16 autocast and channels_last too."""
    from mtl.gramian import plan, recording, staged_gramian
    from mtl.trunks import build_trunk

    torch.manual_seed(0)
    trunk = build_trunk({"name": "resnet18", "small_input": True}).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast, recording(trunk) as cuts:
        features = trunk(x)
        objectives = torch.nn.Linear(512, 5).cuda()(features).float().square().mean(dim=0)
    shared = list(trunk.parameters())
    stages = plan(objectives, cuts, shared)
    assert stages is not None and len(stages) == 3
    J = jacobian(objectives, shared)
    expected = J @ J.T
    G = staged_gramian(objectives, stages, chunk=2)
    torch.testing.assert_close(G, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
