"""Fixtures of the blob and model.infer tests: tiny models made in the test."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from blob_fixtures import MeanColour, TinyNet, TinyPair


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A torch.export archive and a TorchScript file of small deterministic models."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    net = TinyNet().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        net, (torch.randn(2, 3, 16, 16),), dynamic_shapes={"x": {0: batch}}
    )
    export_path = root / "tiny.pt2"
    torch.export.save(program, export_path)
    pair = TinyPair().eval()
    script_path = root / "tiny_pair.pt"
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream; users still have such files.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(pair), script_path)
        nhwc_path = root / "mean_colour.pt"
        torch.jit.save(torch.jit.script(MeanColour()), nhwc_path)
    state_path = root / "tiny_state.pt"
    torch.save(net.state_dict(), state_path)
    return {
        "export": export_path,
        "torchscript": script_path,
        "nhwc_uint8": nhwc_path,
        "state": state_path,
    }


@pytest.fixture(scope="session")
def tiny_net_reference(tiny_models: dict[str, Path]) -> TinyNet:
    """The exported model's weights in a plain module, to check outputs against."""
    net = TinyNet().eval()
    net.load_state_dict(torch.load(tiny_models["state"]))
    return net
