"""The exports of an open_clip CLIP made from its tensors: the image tower as an ONNX graph, the text tower as
the numpy weights textfast runs.

The tensors are a loaded model's state dict (numpy views: state_arrays) or a safetensors checkpoint, memory-mapped
without torch (Checkpoint); what they cannot say (heads, activation, eps, pooling) comes from the model's modules
(model_facts) or its open_clip config (config_facts). Only open_clip's plain CLIP towers are described: anything
else raises Unsupported and the caller falls back to torch. Every result is verified before use. Graphs are
written as protobuf by hand (no onnx import).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .config import atomic_file

EXTERNAL_BYTES = 1_500_000_000  # initializers past this go to a data file beside the graph (protobuf's 2 GB cap)
_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
          "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
          "mlp.c_proj.weight", "mlp.c_proj.bias")
_NOT_A_TOWER = {"logit_scale", "logit_bias", "attn_mask"}


class Unsupported(Exception):
    """These tensors or this config are not a tower described here; the message says what differs."""


class Checkpoint(Mapping):
    """A safetensors file's tensors by name, each memory-mapped on access (bf16 widened to float32). The header
    is checked before use (its length against the file, every tensor's extent against the data), so a damaged
    or hostile file is refused in one line (ModelLoadError) instead of asking for its claimed gigabytes."""

    _DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
    _SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
    MAX_HEADER = 100_000_000  # the safetensors format's own cap on the JSON header

    def __init__(self, path: str | os.PathLike):
        from .errors import ModelLoadError

        def refuse(why: str):
            return ModelLoadError(f"{path} is not a readable safetensors file ({why}); download it again, or use other "
                                  "weights")

        try:
            self._raw = np.memmap(path, np.uint8, "r")
        except ValueError:  # numpy cannot map an empty file
            raise refuse("it is empty") from None
        size = int.from_bytes(bytes(self._raw[:8]), "little")
        if len(self._raw) < 10 or not 2 <= size <= min(len(self._raw) - 8, self.MAX_HEADER):
            raise refuse("its header length does not fit the file")
        try:
            header = json.loads(bytes(self._raw[8:8 + size]))
        except (ValueError, RecursionError):
            raise refuse("its header is not JSON") from None
        if not isinstance(header, dict):
            raise refuse("its header is not a table of tensors")
        header.pop("__metadata__", None)
        data = len(self._raw) - 8 - size
        for name, entry in header.items():
            if not self._fits(entry, data):
                raise refuse(f"tensor {str(name)[:80]!r} does not fit the file")
        self._header, self._base = header, 8 + size

    @classmethod
    def _fits(cls, entry, data: int) -> bool:
        try:
            (start, end), shape, itemsize = entry["data_offsets"], entry["shape"], cls._SIZES[entry["dtype"]]
            ints = all(type(v) is int for v in (start, end, *shape))
            return ints and 0 <= start <= end <= data and min(shape, default=0) >= 0 \
                and math.prod(shape) * itemsize == end - start
        except (TypeError, KeyError, ValueError):
            return False

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._header[name]
        if entry["dtype"] not in self._DTYPES:
            raise Unsupported(f"tensor {name} is {entry['dtype']}")
        start, end = entry["data_offsets"]
        a = self._raw[self._base + start:self._base + end].view(self._DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return (a.astype(np.uint32) << 16).view(np.float32) if entry["dtype"] == "BF16" else a

    def shape_of(self, name: str) -> list[int]:
        return list(self._header[name]["shape"])

    def __iter__(self):
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)


def state_arrays(model) -> dict[str, np.ndarray]:
    """A loaded model's floating-point state as float32 numpy arrays: views of an fp32 CPU model's tensors."""
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


def _act_name(module) -> str:
    from open_clip.transformer import QuickGELU
    from torch import nn

    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if type(module) is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    raise Unsupported(f"activation {type(module).__name__} is not supported")


def model_facts(model, tower: str) -> dict:
    """What the ``tower`` ("visual" or "text") tensors of a loaded open_clip model cannot say, from its modules."""
    from open_clip import transformer as oc
    from torch import nn

    if tower == "visual":
        owner = getattr(model, "visual", None)
        if type(owner) is not oc.VisionTransformer:
            raise Unsupported(f"image tower {type(owner).__name__} is not open_clip's VisionTransformer")
        if owner.attn_pool is not None or owner.pool_type != "tok":
            raise Unsupported("the image tower pools otherwise than by its class token")
        h, w = owner.image_size
        if h != w:
            raise Unsupported(f"image size {h}x{w} is not square")
        facts, norms = {"image_size": int(h)}, [owner.ln_pre, owner.ln_post]
    else:
        owner = model
        if getattr(model, "attn_mask", None) is None or getattr(model, "text_pool_type", None) not in ("argmax", "eos"):
            raise Unsupported("text tower is not open_clip's causal CLIP text transformer")
        facts, norms = {"pool": model.text_pool_type}, [getattr(model, "ln_final", None)]
    blocks = list(getattr(getattr(owner, "transformer", None), "resblocks", []))
    if not blocks or any(type(b) is not oc.ResidualAttentionBlock or type(b.attn) is not nn.MultiheadAttention
                         or hasattr(b, "ln_1_kv") for b in blocks):
        raise Unsupported(f"{tower} blocks are not open_clip's ResidualAttentionBlock")
    norms += [n for b in blocks for n in (b.ln_1, b.ln_2)]
    if not all(isinstance(n, nn.LayerNorm) for n in norms):
        raise Unsupported(f"{tower} norms are not LayerNorm")
    acts, eps, heads = ({f(b) for b in blocks} for f in (lambda b: _act_name(b.mlp.gelu), lambda b: b.ln_1.eps,
                                                          lambda b: b.attn.num_heads))
    eps |= {n.eps for n in norms}
    if len(acts) != 1 or len(eps) != 1 or len(heads) != 1:
        raise Unsupported(f"mixed activations, LayerNorm eps or head counts across {tower} layers")
    return {**facts, "act": acts.pop(), "eps": float(eps.pop()), "heads": int(heads.pop())}


_VIT_EXTRAS = ("timm_model_name", "attentional_pool", "ls_init_value", "no_ln_pre", "final_ln_after_pool",
               "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
               "scale_fc", "output_tokens")
_TEXT_EXTRAS = ("hf_model_name", "no_causal_mask", "embed_cls", "block_type", "qk_norm", "scaled_cosine_attn",
                "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "output_tokens")


def config_facts(model_cfg: dict, tower: str) -> dict:
    """model_facts from an open_clip model config (open_clip's defaults where it says nothing), without torch."""
    cfg = model_cfg.get("vision_cfg" if tower == "visual" else "text_cfg") or {}
    if model_cfg.get("custom_text") or "multimodal_cfg" in model_cfg:
        raise Unsupported("the model is not open_clip's CLIP")
    extras = [k for k in (_VIT_EXTRAS if tower == "visual" else _TEXT_EXTRAS) if cfg.get(k)]
    act_kwargs = dict(cfg.get("act_kwargs") or {})
    approx = act_kwargs.pop("approximate", "none")
    if extras or act_kwargs or set(cfg.get("norm_kwargs") or {}) - {"eps"}:
        raise Unsupported(f"{tower} config sets {extras or 'other norm or activation arguments'}")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu_tanh" if approx == "tanh" else "gelu"
    eps = float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))
    if tower == "visual":
        size, layers = cfg.get("image_size", 224), cfg.get("layers", 12)
        if isinstance(layers, (list, tuple)) or cfg.get("pool_type", "tok") != "tok" \
                or cfg.get("pos_embed_type", "learnable") != "learnable":
            raise Unsupported("the image tower is not a ViT pooled by its class token")
        if isinstance(size, (list, tuple)):
            if size[0] != size[1]:
                raise Unsupported(f"image size {size} is not square")
            size = size[0]
        return {"image_size": int(size), "act": act, "eps": eps,
                "heads": int(cfg.get("width", 768)) // int(cfg.get("head_width", 64))}
    pool = cfg.get("pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise Unsupported(f"text pooling {pool!r} is not supported")
    return {"pool": pool, "act": act, "eps": eps, "heads": int(cfg.get("heads", 8))}


def check_config(model_cfg: dict, arrays: Mapping) -> None:
    """Unsupported when the sizes an open_clip config declares (open_clip's defaults where it says nothing) are
    not the tensors' sizes: open_clip would refuse these weights for it, or resize them."""
    v, t = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    width, text_width, patch = v.get("width", 768), t.get("width", 512), v.get("patch_size", 16)
    want = {"visual.conv1.weight": [width, 3, patch, patch], "visual.proj": [width, model_cfg.get("embed_dim")],
            "visual.transformer.resblocks.0.mlp.c_fc.weight": [int(width * v.get("mlp_ratio", 4.0)), width],
            "token_embedding.weight": [t.get("vocab_size", 49408), text_width],
            "positional_embedding": [t.get("context_length", 77), text_width],
            f"visual.transformer.resblocks.{v.get('layers', 12) - 1}.ln_1.weight": [width],
            f"transformer.resblocks.{t.get('layers', 12) - 1}.ln_1.weight": [text_width]}
    if "text_projection" in arrays:
        want["text_projection"] = [text_width, model_cfg.get("embed_dim")]
    shape_of = getattr(arrays, "shape_of", lambda k: list(arrays[k].shape))
    for name, shape in want.items():
        have = shape_of(name) if name in arrays else None
        if have != shape:
            raise Unsupported(f"the config does not fit the weights: {name} is {have}, the config says {shape}")
    for tower, layers in (("visual.", v.get("layers", 12)), ("", t.get("layers", 12))):
        if f"{tower}transformer.resblocks.{layers}.ln_1.weight" in arrays:
            raise Unsupported(f"the config does not fit the weights: {tower or 'text '}layers beyond {layers}")


def _check_keys(have: set, want: set, tower: str) -> None:
    extra, missing = sorted(have - want), sorted(want - have)
    if extra or missing:
        raise Unsupported(f"{tower} tower has tensors {extra[:3]} and lacks {missing[:3]}" if extra else
                          f"{tower} tower lacks tensors {missing[:3]}")


def _layers(keys, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def vit_shape(arrays: Mapping, facts: dict) -> dict:
    """The plain open_clip ViT in ``arrays`` (state-dict names): width, layers, heads, patch, image size, dim."""
    p = "visual."
    have = {k[len(p):] for k in arrays if k.startswith(p)}
    if "conv1.weight" not in have or "transformer.resblocks.0.attn.in_proj_weight" not in have:
        raise Unsupported("the image tower is not open_clip's ViT")
    width, channels, patch, patch_w = arrays[p + "conv1.weight"].shape
    layers = _layers(have, "transformer.resblocks.")
    _check_keys(have, {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
                       "ln_post.weight", "ln_post.bias", "proj"}
                | {f"transformer.resblocks.{i}.{n}" for i in range(layers) for n in _BLOCK}, "image")
    tokens = arrays[p + "positional_embedding"].shape[0]
    grid = math.isqrt(tokens - 1)
    size = int(facts.get("image_size") or grid * patch)
    if channels != 3 or patch != patch_w or (size // patch) ** 2 + 1 != tokens or width % facts["heads"]:
        raise Unsupported(f"image tower shapes do not fit: conv {arrays[p + 'conv1.weight'].shape}, {tokens} "
                          f"positions for {size} px, {facts['heads']} heads of width {width}")
    return {"width": int(width), "layers": layers, "heads": int(facts["heads"]), "patch": int(patch),
            "image_size": size, "tokens": int(tokens), "dim": int(arrays[p + "proj"].shape[1])}


class _Graph:
    """ONNX nodes and initializers (name, array: views or _Int8Columns, written one at a time by _save)."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def init(self, name: str, array) -> str:
        self.inits.append((name, array))
        return name

    def op(self, op: str, *inputs: str, outputs: int = 1, output: str | None = None, **attrs):
        names = [output] if output else [f"{op}_{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(_node(op, inputs, names, attrs))
        return names[0] if outputs == 1 else names


# --- ONNX's protobuf messages, written by hand (onnx.proto, proto2: repeated numbers unpacked) -------------
# Importing onnx costs 0.6 s (ml_dtypes), a tenth of a first run; these few messages are all a graph needs.
FLOAT, INT8, INT64 = 1, 3, 7  # TensorProto.DataType


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s as their two's complement, as protobuf writes them
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One field: bytes/str length-delimited, float as fixed32, int as varint."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def _node(op: str, inputs, outputs, attrs: dict) -> bytes:
    """NodeProto: input 1, output 2, op_type 4, attribute 5 (AttributeProto: name 1, f 2, i 3, ints 8,
    type 20: FLOAT 1, INT 2, INTS 7)."""
    out = b"".join(_field(1, x) for x in inputs) + b"".join(_field(2, x) for x in outputs) + _field(4, op)
    for name, value in sorted(attrs.items()):
        if isinstance(value, float):
            body = _field(2, value) + _field(20, 1)
        elif isinstance(value, (list, tuple)):
            body = b"".join(_field(8, v) for v in value) + _field(20, 7)
        else:
            body = _field(3, value) + _field(20, 2)
        out += _field(5, _field(1, name) + body)
    return out


def _value_info(name: str, elem_type: int, shape) -> bytes:
    """ValueInfoProto: name 1, type 2 (TypeProto.tensor_type 1: elem_type 1, shape 2 of dims 1: value 1 or
    param 2)."""
    dims = b"".join(_field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in shape)
    return _field(1, name) + _field(2, _field(1, _field(1, elem_type) + _field(2, dims)))


def _tensor_header(name: str, shape, data_type: int, external: dict | None = None) -> bytes:
    """TensorProto without its data: dims 1, data_type 2, name 8, external_data 13 (key 1, value 2),
    data_location 14 (EXTERNAL 1)."""
    out = b"".join(_field(1, d) for d in shape) + _field(2, data_type) + _field(8, name)
    if external is not None:
        out += b"".join(_field(13, _field(1, k) + _field(2, str(v))) for k, v in external.items()) + _field(14, 1)
    return out


class _Int8Columns:
    """A weight [in, out] quantised per output column to the bits onnxruntime's quantize_dynamic(per_channel=True,
    reduce_range=False) gives: scale = max|w| / 127 rounded from float64 to float32 (1.0 for a zero column),
    q = round-half-even(w / scale). The int8 tensor is made only when _save writes it, one weight at a time."""

    dtype = np.dtype(np.int8)

    def __init__(self, w: np.ndarray):
        self.w, self.shape, self.size = w, w.shape, w.size
        absmax = np.maximum(w.max(0), -w.min(0)).astype(np.float64)
        scale = absmax * 2 / 254
        self.scale = np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)

    def __array__(self, dtype=None, copy=None):
        q = np.asarray(self.w, np.float32) / self.scale
        return np.clip(q.round(out=q), -128, 127, out=q).astype(dtype or np.int8)


def write_image_graph(arrays: Mapping, facts: dict, path: str | os.PathLike, opset: int, int8: bool = False) -> dict:
    """The ONNX graph of the ViT image tower in ``arrays`` ("pixels" [n, 3, S, S] -> unnormalised "features"
    [n, dim], as open_clip's encode_image), written to ``path``; returns vit_shape's dict.

    ``int8``: every weight MatMul dynamically quantised as onnxruntime's quantize_dynamic does it (INT8_RECIPE
    in onnx_image): DynamicQuantizeLinear, MatMulInteger, Cast, Mul by both scales. The patch Conv stays fp32
    (as a MatMul it quantised worse: ViT-B-32 int8 parity 0.990 -> 0.953), and so does attention's activation
    x activation; one fused QKV MatMul per block, three Transposes where torch's traced attention has eight.
    """
    s = vit_shape(arrays, facts)
    width, heads, tokens, p = s["width"], s["heads"], s["tokens"], "visual."
    hd = width // heads
    g = _Graph()
    f32 = lambda name, v: g.init(name, np.array(v, np.float32))  # noqa: E731
    i64 = lambda name, v: g.init(name, np.array(v, np.int64))  # noqa: E731

    def ln(x, key):
        return g.op("LayerNormalization", x, g.init(key + ".weight", arrays[key + ".weight"]),
                    g.init(key + ".bias", arrays[key + ".bias"]), axis=-1, epsilon=facts["eps"])

    def matmul(x, name, w, output=None):  # x @ w, w [in, out]
        if not int8:
            return g.op("MatMul", x, g.init(name, w), output=output)
        q = _Int8Columns(w)
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        scale = g.op("Mul", xs, g.init(name + "_scale", q.scale))
        y = g.op("MatMulInteger", xq, g.init(name + "_quantized", q), xz,
                 g.init(name + "_zero_point", np.zeros(w.shape[1], np.int8)))
        return g.op("Mul", g.op("Cast", y, to=FLOAT), scale, output=output)

    def linear(x, key, weight="weight", bias="bias"):  # x @ W.T + b, W.T stored as a view
        y = matmul(x, f"{key}.{weight}.T", arrays[f"{key}.{weight}"].T)
        return g.op("Add", y, g.init(f"{key}.{bias}", arrays[f"{key}.{bias}"]))

    if facts["act"] == "quick_gelu":
        quick = f32("quick", 1.702)
        act = lambda x: g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, quick)))  # noqa: E731
    elif facts["act"] == "gelu":  # erf form, as torch exports it: onnxruntime fuses it into one Gelu
        half, one, sqrt2 = f32("half", 0.5), f32("one", 1.0), f32("sqrt2", math.sqrt(2.0))
        act = lambda x: g.op("Mul", g.op("Mul", x, g.op("Add", g.op("Erf", g.op("Div", x, sqrt2)), one)), half)  # noqa
    else:
        raise Unsupported(f"activation {facts['act']} is not in the image graph")

    x = g.op("Conv", "pixels", g.init(p + "conv1.weight", arrays[p + "conv1.weight"]),
             kernel_shape=[s["patch"]] * 2, strides=[s["patch"]] * 2)
    x = g.op("Transpose", g.op("Reshape", x, i64("patches", [0, width, -1])), perm=[0, 2, 1])
    # An empty class-token slot, filled by the position table (class embedding folded into row 0: no Expand).
    x = g.op("Pad", x, i64("cls_slot", [0, 1, 0, 0, 0, 0]))
    pos = arrays[p + "positional_embedding"].astype(np.float32)
    pos[0] += arrays[p + "class_embedding"]
    x = ln(g.op("Add", x, g.init(p + "positional_embedding+class", pos)), p + "ln_pre")
    qkv_shape, merged = i64("qkv_shape", [0, 0, 3, heads, hd]), i64("merged", [-1, tokens, width])
    axis0 = i64("axis0", [0])
    scale = f32("scale", hd ** -0.5)
    for i in range(s["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        qkv = g.op("Reshape", linear(ln(x, b + "ln_1"), b + "attn", "in_proj_weight", "in_proj_bias"), qkv_shape)
        # Squeezed to 4-D [n, heads, tokens, hd]: with 5-D Transposes and MatMuls int8 measured slower.
        q, k, v = (g.op("Squeeze", t, axis0) for t in g.op("Split", g.op("Transpose", qkv, perm=[2, 0, 3, 1, 4]),
                                                          outputs=3, axis=0))
        att = g.op("Softmax", g.op("MatMul", g.op("Mul", q, scale), g.op("Transpose", k, perm=[0, 1, 3, 2])), axis=-1)
        o = g.op("Reshape", g.op("Transpose", g.op("MatMul", att, v), perm=[0, 2, 1, 3]), merged)
        x = g.op("Add", x, linear(o, b + "attn.out_proj"))
        x = g.op("Add", x, linear(act(linear(ln(x, b + "ln_2"), b + "mlp.c_fc")), b + "mlp.c_proj"))
    # ln_post normalises each token on its own: on the class token alone it gives the same row.
    x = ln(g.op("Gather", x, i64("class_token", 0), axis=1), p + "ln_post")
    matmul(x, p + "proj", arrays[p + "proj"], "features")
    size = s["image_size"]
    graph = (b"".join(_field(1, n) for n in g.nodes) + _field(2, "clip_image")
             + _field(11, _value_info("pixels", FLOAT, ["n", 3, size, size]))
             + _field(12, _value_info("features", FLOAT, ["n", s["dim"]])))
    # ModelProto: ir_version 1, producer_name 2, opset_import 8 (domain 1, version 2); the graph, field 7, by _save
    model = _field(1, 8) + _field(2, "imgsearch") + _field(8, _field(1, "") + _field(2, opset))
    _save(model, graph, g.inits, Path(path))
    return s


def _save(model: bytes, graph: bytes, inits: list[tuple[str, np.ndarray]], path: Path) -> None:
    """The ModelProto ``model`` with ``graph`` (GraphProto fields but the initializers) and ``inits`` as its
    initializers (field 5), streamed one tensor at a time (one message would hold two more copies of a 350 MB
    tower). Past EXTERNAL_BYTES the tensors go to ``<path>.data``, int64 ones staying inline for shape
    inference. Written under temporary names (config.atomic_file), then renamed into place."""
    kinds = [{"i8": ("<i8", INT64), "i1": ("i1", INT8)}.get(a.dtype.str[1:], ("<f4", FLOAT)) for _, a in inits]
    sizes = [np.dtype(k).itemsize * a.size for (_, a), (k, _) in zip(inits, kinds)]
    data = path.with_name(path.name + ".data")
    external = sum(sizes) > EXTERNAL_BYTES
    heads, offset = [], 0
    for (name, a), (k, kind), size in zip(inits, kinds, sizes):
        if external and kind != INT64:
            heads.append((_tensor_header(name, a.shape, kind, {"location": data.name, "offset": offset,
                                                               "length": size}), 0))
            offset += size
        else:  # raw_data (field 9) follows each tensor's header; protobuf reads fields in any order
            heads.append((_tensor_header(name, a.shape, kind) + _varint(9 << 3 | 2) + _varint(size), size))
    lengths = [len(h) + n for h, n in heads]
    with atomic_file(path, sweep=True) as f:  # the data file is renamed into place first, then the graph
        f.write(model + _varint(7 << 3 | 2) + _varint(len(graph) + sum(1 + len(_varint(n)) + n for n in lengths))
                + graph)
        for (head, inline), n, (_, a), (k, _) in zip(heads, lengths, inits, kinds):
            f.write(_varint(5 << 3 | 2) + _varint(n) + head)
            if inline:
                np.ascontiguousarray(a, k).tofile(f)
        if external:
            with atomic_file(data, sweep=True) as d:
                for (_, a), (k, kind) in zip(inits, kinds):
                    if kind != INT64:
                        np.ascontiguousarray(a, k).tofile(d)


def text_weights(arrays: Mapping, facts: dict) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """The plain CLIP text tower in ``arrays`` as textfast's facts and (name, array) list (weights as [in, out]
    views, layer scale kept); tokenizer facts are the caller's."""
    have = {k for k in arrays if not k.startswith("visual.") and k not in _NOT_A_TOWER}
    layers = _layers(have, "transformer.resblocks.")
    block = "transformer.resblocks.{}."
    want = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    want |= {block.format(i) + n for i in range(layers) for n in _BLOCK}
    want |= {k for k in have if k.startswith("text_projection") or
             any(k == block.format(i) + f"ls_{j}.gamma" for i in range(layers) for j in (1, 2))}
    if not layers:
        raise Unsupported("no open_clip CLIP text tower in these weights")
    _check_keys(have, want, "text")
    out = [("token_embedding", arrays["token_embedding.weight"]), ("positional_embedding",
                                                                  arrays["positional_embedding"])]
    rename = [("ln_1.w", "ln_1.weight", False), ("ln_1.b", "ln_1.bias", False),
              ("in_proj.w", "attn.in_proj_weight", True), ("in_proj.b", "attn.in_proj_bias", False),
              ("out_proj.w", "attn.out_proj.weight", True), ("out_proj.b", "attn.out_proj.bias", False),
              ("ls_1", "ls_1.gamma", False), ("ln_2.w", "ln_2.weight", False), ("ln_2.b", "ln_2.bias", False),
              ("c_fc.w", "mlp.c_fc.weight", True), ("c_fc.b", "mlp.c_fc.bias", False),
              ("c_proj.w", "mlp.c_proj.weight", True), ("c_proj.b", "mlp.c_proj.bias", False),
              ("ls_2", "ls_2.gamma", False)]
    for i in range(layers):
        out += [(f"l{i}.{ours}", arrays[block.format(i) + theirs].T if t else arrays[block.format(i) + theirs])
                for ours, theirs, t in rename if block.format(i) + theirs in have]
    out += [("ln_final.w", arrays["ln_final.weight"]), ("ln_final.b", arrays["ln_final.bias"])]
    if "text_projection" in have:
        out.append(("proj.w", arrays["text_projection"]))
    elif "text_projection.weight" in have:
        out.append(("proj.w", arrays["text_projection.weight"].T))
        if "text_projection.bias" in have:
            out.append(("proj.b", arrays["text_projection.bias"]))
    width = int(arrays["positional_embedding"].shape[1])
    if width % facts["heads"]:
        raise Unsupported(f"{facts['heads']} heads do not divide text width {width}")
    return ({"width": width, "heads": int(facts["heads"]), "layers": layers, "act": facts["act"],
             "eps": float(facts["eps"]), "pool": facts["pool"],
             "vocab_size": int(arrays["token_embedding.weight"].shape[0])}, out)
