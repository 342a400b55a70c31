"""clipgraph: open_clip's plain CLIP towers made from their tensors give torch's features; other towers are
refused with the reason, and the image export then traces them with torch as before."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from imgsearch import clipgraph, onnx_image
from imgsearch.synthetic import tiny_model_config


def _clip(image_size=32, quick_gelu=False, seed=0, **vision):
    import open_clip
    import torch

    cfg = tiny_model_config(image_size=image_size)
    cfg["vision_cfg"].update(vision)
    cfg["quick_gelu"] = quick_gelu
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg).eval(), cfg


def _torch_features(model, pixels):
    import torch

    with torch.no_grad():
        return model.encode_image(torch.from_numpy(pixels)).numpy()


def _run(path, pixels):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("quick_gelu", [False, True])
@pytest.mark.parametrize("size", [32, 48])
def test_image_graph_gives_torchs_features(tmp_path, quick_gelu, size):
    model, cfg = _clip(size, quick_gelu)
    facts = clipgraph.model_facts(model, "visual")
    assert facts == clipgraph.config_facts(cfg, "visual")  # the loaded modules and the config agree
    assert facts["act"] == ("quick_gelu" if quick_gelu else "gelu") and facts["heads"] == 2
    shape = clipgraph.write_image_graph(clipgraph.state_arrays(model), facts, tmp_path / "g.onnx", onnx_image.OPSET)
    assert shape["image_size"] == size and shape["dim"] == 64 and shape["layers"] == 2
    pixels = onnx_image.probe_batch(size)
    want, got = _torch_features(model, pixels), _run(tmp_path / "g.onnx", pixels)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert (_unit(got) * _unit(want)).sum(1).min() >= 0.9999


def test_towers_it_does_not_describe_are_refused_with_the_reason(tmp_path):
    layer_scale, _ = _clip(ls_init_value=0.1)
    with pytest.raises(clipgraph.Unsupported, match=r"image tower has tensors \['transformer.resblocks.0.ls_1"):
        clipgraph.write_image_graph(clipgraph.state_arrays(layer_scale), clipgraph.model_facts(layer_scale, "visual"),
                                    tmp_path / "g.onnx", onnx_image.OPSET)
    model, cfg = _clip()
    arrays = clipgraph.state_arrays(model)
    del arrays["visual.ln_post.bias"]
    with pytest.raises(clipgraph.Unsupported, match=r"lacks tensors \['ln_post.bias'\]"):
        clipgraph.vit_shape(arrays, clipgraph.model_facts(model, "visual"))
    resnet, cfg = _clip(image_size=64, layers=[1, 1, 1, 1], width=16)
    with pytest.raises(clipgraph.Unsupported, match="ModifiedResNet is not open_clip's VisionTransformer"):
        clipgraph.model_facts(resnet, "visual")
    with pytest.raises(clipgraph.Unsupported, match="image tower is not a ViT"):
        clipgraph.config_facts(cfg, "visual")
    assert not (tmp_path / "g.onnx").exists()
    model, cfg = _clip()  # a config whose sizes are not the tensors' (open_clip would refuse them)
    clipgraph.check_config(cfg, clipgraph.state_arrays(model))
    with pytest.raises(clipgraph.Unsupported, match=r"visual.proj is \[64, 64\], the config says \[64, 32\]"):
        clipgraph.check_config({**cfg, "embed_dim": 32}, clipgraph.state_arrays(model))
    with pytest.raises(clipgraph.Unsupported, match="text layers beyond 1"):
        clipgraph.check_config({**cfg, "text_cfg": {**cfg["text_cfg"], "layers": 1}}, clipgraph.state_arrays(model))


def test_a_refused_vit_is_traced_by_torch_and_verified(tmp_path, home):
    """A ViT with layer scale is left to torch.onnx.export, which must not meet nn.MultiheadAttention's fused
    inference kernel (it cannot trace it) and must not switch that kernel off for the whole process."""
    import onnx
    import torch

    from imgsearch.encoder import ModelSpec, build, save_local_dir

    model, cfg = _clip(ls_init_value=0.1)
    folder = save_local_dir(model, cfg, tmp_path / "model", {"size": 32})
    enc = build(ModelSpec(f"local-dir:{folder}"), "cpu", "fp32")
    tower, manifest = onnx_image.ensure_export(enc, home, "fp32", threads=1)
    assert manifest["fp32"]["passed"] and torch.backends.mha.get_fastpath_enabled()
    path = onnx_image.export_dir(home, enc.fingerprint) / onnx_image.FP32_FILE
    assert onnx.load(str(path)).producer_name == "pytorch"
    pixels = onnx_image.probe_batch(32)
    assert (tower.encode(pixels) * enc.encode_image_tensors(torch.from_numpy(pixels))).sum(1).min() >= 0.9999


def test_large_initializers_go_to_a_data_file_beside_the_graph(tmp_path, monkeypatch):
    model, _ = _clip()
    monkeypatch.setattr(clipgraph, "EXTERNAL_BYTES", 0)
    clipgraph.write_image_graph(clipgraph.state_arrays(model), clipgraph.model_facts(model, "visual"),
                                tmp_path / "g.onnx", onnx_image.OPSET)
    assert (tmp_path / "g.onnx").stat().st_size < 20_000 < (tmp_path / "g.onnx.data").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]  # no temporary left
    import onnx

    onnx.checker.check_model(str(tmp_path / "g.onnx"), full_check=True)
    pixels = onnx_image.probe_batch(32)
    assert (_unit(_run(tmp_path / "g.onnx", pixels)) * _unit(_torch_features(model, pixels))).sum(1).min() >= 0.9999


@pytest.mark.parametrize("external", [False, True])
def test_int8_graph_is_onnxruntimes_quantisation_of_the_fp32_graph_to_the_bit(tmp_path, monkeypatch, external):
    """The int8 graph written from the tensors is the one quantize_dynamic made of the fp32 graph (the
    INT8_RECIPE every int8 export and parity verdict is keyed by): same ops, same int8 weights and scales, so
    the same features; without a quantiser and with no more than one weight quantised at a time."""
    import onnx
    from onnx import numpy_helper

    model, _ = _clip()
    arrays, facts = clipgraph.state_arrays(model), clipgraph.model_facts(model, "visual")
    arrays["visual.transformer.resblocks.0.mlp.c_fc.weight"][5] = 0  # an all-zero column gets scale 1
    clipgraph.write_image_graph(arrays, facts, tmp_path / "fp32.onnx", onnx_image.OPSET)
    onnx_image._quantise_int8(tmp_path / "fp32.onnx", tmp_path / "theirs.onnx")
    monkeypatch.setattr(clipgraph, "EXTERNAL_BYTES", 0 if external else clipgraph.EXTERNAL_BYTES)
    clipgraph.write_image_graph(arrays, facts, tmp_path / "ours.onnx", onnx_image.OPSET, int8=True)
    assert (tmp_path / "ours.onnx.data").exists() == external
    theirs, ours = (onnx.load(str(tmp_path / f"{n}.onnx")) for n in ("theirs", "ours"))
    ops = [n.op_type for n in ours.graph.node]
    assert ops == [n.op_type for n in theirs.graph.node] and ops.count("MatMulInteger") == 2 * 4 + 1
    want = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
    pixels = onnx_image.probe_batch(32)
    assert np.array_equal(_run(tmp_path / "ours.onnx", pixels), _run(tmp_path / "theirs.onnx", pixels))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_towers_from_a_safetensors_file_without_torch(tmp_path, dtype):
    import safetensors.torch
    import torch

    model, cfg = _clip()
    state = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    model.load_state_dict(state)  # the reference holds the same (rounded) numbers
    code = ("import json, sys; sys.modules['torch'] = sys.modules['onnx'] = None\n"  # the protobuf is ours
            "from imgsearch import clipgraph\n"
            "cfg, path = json.loads(sys.argv[1]), sys.argv[2]\n"
            "w = clipgraph.Checkpoint(path + '/w.safetensors')\n"
            "clipgraph.write_image_graph(w, clipgraph.config_facts(cfg, 'visual'), path + '/g.onnx', 17)\n"
            "facts, arrays = clipgraph.text_weights(w, clipgraph.config_facts(cfg, 'text'))\n"
            "print(json.dumps(facts))\n")
    import json

    done = subprocess.run([sys.executable, "-c", code, json.dumps(cfg), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-800:]
    facts, arrays = clipgraph.text_weights(clipgraph.state_arrays(model), clipgraph.model_facts(model, "text"))
    assert json.loads(done.stdout) == facts
    ours = dict(clipgraph.text_weights(clipgraph.Checkpoint(tmp_path / "w.safetensors"), facts)[1])
    assert [n for n, _ in arrays] == list(ours) and all(np.array_equal(a, ours[n]) for n, a in arrays)
    import onnx

    onnx.checker.check_model(str(tmp_path / "g.onnx"), full_check=True)  # a valid model, shapes inferred
    graph = onnx.load(str(tmp_path / "g.onnx")).graph
    assert [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in
            (*graph.input, *graph.output)] == [("pixels", ["n", 3, 32, 32]), ("features", ["n", 64])]
    pixels = onnx_image.probe_batch(32)
    got, want = _run(tmp_path / "g.onnx", pixels), _torch_features(model.float(), pixels)
    assert (_unit(got) * _unit(want)).sum(1).min() >= 0.9999
