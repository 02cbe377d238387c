"""model.infer through the handler harness: both model formats, images and video, bad inputs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from blob_fixtures import TinyNet, make_images, make_video

from worker.handlers.model_infer import MODEL_CACHE, ModelInfer
from worker.sdk import PermanentError
from worker.testing import FakeJobContext, run_handler


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    MODEL_CACHE.clear()


def test_images_export_model_npy_letterbox(
    tiny_models: dict[str, Path], tiny_net_reference: TinyNet, tmp_path: Path
) -> None:
    images = make_images(tmp_path, [(20, 30), (16, 16), (40, 10)])
    params = {
        "resize": "letterbox",
        "size": [16, 16],
        "batch_size": 2,
        "output": "npy",
        "mean": [0.5],
        "std": [0.25],
    }
    res = run_handler(
        ModelInfer(), params, [tiny_models["export"], *images], workdir=tmp_path / "w"
    )
    assert res.error is None, res.traceback or res.error
    assert res.result["items"] == 3 and res.result["batches"] == 2
    assert res.result["model_format"] == "export" and res.result["model_cached"] is False
    assert res.result["outputs"] == {"output": [4]}
    out = np.load(res.outputs["output-00000.npy"])
    assert out.shape == (3, 4)
    index = [json.loads(line) for line in res.outputs["index.jsonl"].read_text().splitlines()]
    assert [r["row"] for r in index] == [0, 1, 2] and index[0]["name"] == "img0.png"
    # Same numbers as the module itself on the letterboxed, normalised pixels.
    rgb = cv2.cvtColor(cv2.imread(str(images[1])), cv2.COLOR_BGR2RGB)  # 16x16: no resize
    x = (torch.from_numpy(rgb).float() / 255.0 - 0.5) / 0.25
    expected = tiny_net_reference(x.permute(2, 0, 1)[None]).detach().numpy()[0]
    np.testing.assert_allclose(out[1], expected, rtol=1e-4, atol=1e-5)
    # Progress in items, ending complete.
    items = [p for p in res.progress if p["unit"] == "items"]
    assert items[-1]["done"] == items[-1]["total"] == 3
    # A second job with the same model reuses the loaded one.
    again = run_handler(ModelInfer(), params, [tiny_models["export"], images[0]])
    assert again.error is None and again.result["model_cached"] is True


def test_video_torchscript_jsonl_top_k(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    clip = make_video(tmp_path / "clip.mp4", frames=12)
    params = {
        "resize": "stretch",
        "size": [16, 16],
        "batch_size": 4,
        "output": "jsonl",
        "frame_step": 2,
        "top_k": 2,
    }
    res = run_handler(ModelInfer(), params, [tiny_models["torchscript"], clip])
    assert res.error is None, res.traceback or res.error
    assert res.result["items"] == 6 and res.result["model_format"] == "torchscript"
    assert res.result["outputs"] == {"output0": [4], "output1": [1]}
    lines = [json.loads(x) for x in res.outputs["predictions.jsonl"].read_text().splitlines()]
    assert [r["frame"] for r in lines] == [0, 2, 4, 6, 8, 10]
    assert len(lines[0]["outputs"]["output0"]["indices"]) == 2
    assert res.progress[-1]["done"] == res.progress[-1]["total"] == 6


def test_sizes_split_batches_without_resize(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # resize=none with two sizes: items of each size are batched separately.
    images = make_images(tmp_path, [(16, 16), (16, 16), (8, 8)])
    res = run_handler(
        ModelInfer(),
        {"batch_size": 8, "output": "npy"},
        [tiny_models["torchscript"], *images],
    )
    assert res.error is None, res.traceback or res.error
    assert res.result["batches"] == 2
    assert np.load(res.outputs["output1-00000.npy"]).shape == (3, 1)


def test_nhwc_uint8_bgr_video_with_max_items(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    clip = make_video(tmp_path / "clip.mp4", frames=10)
    res = run_handler(
        ModelInfer(),
        {
            "layout": "NHWC",
            "dtype": "uint8",
            "channels": "BGR",
            "batch_size": 3,
            "max_items": 7,
            "shard_items": 4,
        },
        [tiny_models["nhwc_uint8"], clip],
    )
    assert res.error is None, res.traceback or res.error
    assert res.result["items"] == 7 and res.result["dtype"] == "uint8"
    shards = [np.load(res.outputs[f"output-0000{i}.npy"]) for i in range(2)]
    means = np.concatenate(shards)
    assert means.shape == (7, 3)
    # The clip's blue channel is a constant 128 and BGR puts it first.
    np.testing.assert_allclose(means[:, 0], 128, atol=4)


def test_cancel_between_batches(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    clip = make_video(tmp_path / "clip.mp4", frames=6)
    ctx = FakeJobContext(inputs=[tiny_models["export"], clip], workdir=tmp_path / "w")
    ctx.cancel()
    res = run_handler(ModelInfer(), {"resize": "stretch", "size": [16, 16]}, ctx=ctx)
    assert res.cancelled and res.result is None


def _bad(res, code: str) -> str:
    assert isinstance(res.error, PermanentError), res.traceback or res.error
    assert res.error.code == code
    return res.error.message


def test_bad_model_files_fail_permanently(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    images = make_images(tmp_path, [(16, 16)])
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"definitely not a model" * 10)
    msg = _bad(run_handler(ModelInfer(), {}, [junk, *images]), "BAD_MODEL")
    assert "not a model" in msg
    other_zip = tmp_path / "other.pt2"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("x/readme.txt", "hello")
    _bad(run_handler(ModelInfer(), {}, [other_zip, *images]), "BAD_MODEL")
    truncated = tmp_path / "trunc.pt2"
    truncated.write_bytes(tiny_models["export"].read_bytes()[:2000])
    _bad(run_handler(ModelInfer(), {}, [truncated, *images]), "BAD_MODEL")
    # The wrong loader for the file: a TorchScript file forced through torch.export.
    forced = run_handler(ModelInfer(), {"format": "export"}, [tiny_models["torchscript"], *images])
    _bad(forced, "BAD_MODEL")


def test_bad_inputs_fail_permanently(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["export"]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
    _bad(run_handler(ModelInfer(), {}, [model, corrupt]), "INVALID_INPUT")
    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    _bad(run_handler(ModelInfer(), {}, [model, broken_png]), "INVALID_INPUT")
    _bad(run_handler(ModelInfer(), {}, [model]), "INVALID_INPUT")
    url = run_handler(ModelInfer(), {}, ["https://example.invalid/m.pt2", broken_png])
    assert "not a URL" in _bad(url, "INVALID_INPUT")
    # A model that does not accept what the manifest produces (1 channel for 3).
    images = make_images(tmp_path, [(16, 16)])
    gray = run_handler(ModelInfer(), {"channels": "GRAY"}, [model, *images])
    assert "shape" in _bad(gray, "MODEL_ERROR")
    # Params are validated before anything runs.
    bad = run_handler(ModelInfer(), {"resize": "letterbox"}, [model, *images])
    assert "size" in _bad(bad, "INVALID_PARAMS")


def test_model_cache_evicts_least_recently_used_by_file_size() -> None:
    from worker.handlers.model_infer import _ModelCache

    cache = _ModelCache(budget_bytes=100)
    cache.put(("a",), "A", 40)
    cache.put(("b",), "B", 40)
    assert cache.get(("a",)) == "A"  # a is now the most recent
    cache.put(("c",), "C", 40)  # 120 > 100: the least recent (b) goes
    assert cache.get(("b",)) is None and cache.get(("a",)) == "A" and cache.get(("c",)) == "C"
    cache.put(("huge",), "H", 1000)  # over the whole budget: not kept, nothing evicted
    assert cache.get(("huge",)) is None and cache.get(("a",)) == "A"
