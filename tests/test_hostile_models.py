"""Weights and JSON files a user (or a download gone wrong) hands over: a safetensors header that claims
exabytes, tensors that point past the file, JSON nested past the parser's depth. Each is refused in one line
naming the file, before any of its claimed memory is asked for, at the doors that read it."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from imgsearch import clipgraph
from imgsearch.errors import DataError, ModelLoadError

DEEP = "[" * 100_000 + "]" * 100_000  # past CPython's JSON parser depth: a RecursionError, not a ValueError


def _safetensors(header: bytes, claimed: int | None = None, data: bytes = b"\0" * 16) -> bytes:
    return struct.pack("<Q", len(header) if claimed is None else claimed) + header + data


def _tensor(dtype="F32", shape=(2, 2), offsets=(0, 16)) -> bytes:
    return json.dumps({"visual.proj": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}).encode()


@pytest.mark.parametrize("content, why", [
    (_safetensors(b"{}", claimed=2 ** 62, data=b"\0" * 539), "its header length does not fit the file"),
    (_safetensors(b"{}", claimed=20 * 2 ** 30, data=b"\0" * 539), "its header length does not fit the file"),
    (b"\x05\0\0", "its header length does not fit the file"),
    (_safetensors(DEEP.encode()), "its header is not JSON"),
    (_safetensors(b"[1, 2]"), "its header is not a table of tensors"),
    (_safetensors(_tensor(shape=(100_000, 100_000))), "tensor 'visual.proj' does not fit the file"),
    (_safetensors(_tensor(offsets=(0, 4096))), "tensor 'visual.proj' does not fit the file"),
    (_safetensors(_tensor(offsets=(8, 4))), "tensor 'visual.proj' does not fit the file"),
    (_safetensors(_tensor(shape=(-2, -2))), "tensor 'visual.proj' does not fit the file"),
    (_safetensors(_tensor(dtype="Q99")), "tensor 'visual.proj' does not fit the file"),
])
def test_a_damaged_or_hostile_checkpoint_is_refused_in_one_line(tmp_path, content, why):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(content)
    with pytest.raises(ModelLoadError) as e:
        clipgraph.Checkpoint(f)
    message = str(e.value)
    assert f"{f} is not a readable safetensors file ({why})" in message and "\n" not in message


def test_an_empty_checkpoint_is_refused_and_a_sound_one_reads(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="it is empty"):
        clipgraph.Checkpoint(empty)
    sound = tmp_path / "sound.safetensors"
    sound.write_bytes(_safetensors(_tensor(), data=struct.pack("<4f", 1, 2, 3, 4)))
    assert clipgraph.Checkpoint(sound)["visual.proj"].tolist() == [[1, 2], [3, 4]]


def test_index_with_a_hostile_checkpoint_says_so_and_writes_nothing(tiny_model, tmp_path, home, photos):
    """A 549-byte weights file claiming a 4 EiB header: the torch-free export path reads it (int8 on the CPU)."""
    from typer.testing import CliRunner

    from imgsearch.cli import app

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "open_clip_model.safetensors").write_bytes(_safetensors(b"{}", claimed=2 ** 62, data=b"\0" * 539))
    r = CliRunner().invoke(app, ["--home", str(home), "--model", f"local-dir:{model}", "--device", "cpu",
                                 "--precision", "int8", "index", str(photos)])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a readable safetensors file" in lines[0], r.stderr
    assert "internal error" not in r.output and "Traceback" not in r.output
    assert not (home / "library.db").exists()  # refused before a library was made


def test_json_nested_past_the_parser_is_bad_input_at_every_reader(tmp_path):
    from imgsearch.captions import read_captions
    from imgsearch.config import read_json
    from imgsearch.evaluation import read_class_map
    from imgsearch.exchange import MANIFEST, open_export

    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        read_json(DEEP)
    classes = tmp_path / "classes.json"
    classes.write_text(DEEP)
    with pytest.raises(DataError, match="classes.json is not valid JSON"):
        read_class_map(classes)
    (tmp_path / "a.png").write_bytes(b"")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(DEEP + "\n" + json.dumps({"path": "a.png", "caption": "a red circle"}) + "\n")
    found = read_captions(pairs)
    assert [where for where, _ in found.problems] == [f"{pairs}:1"]
    assert "nested too deeply" in found.problems[0][1]
    export = tmp_path / "export"
    export.mkdir()
    (export / MANIFEST).write_text(DEEP)
    with pytest.raises(DataError, match=f"{MANIFEST} is unreadable"):
        open_export(export)


def test_a_gzip_bomb_posing_as_clips_bpe_table_is_refused_within_its_cap(tmp_path):
    """100 MB of zeros in 100 KB of gzip beside the weights: read_merges stops at its cap, never unpacks it all."""
    import gzip
    import tracemalloc

    from imgsearch import bpe

    bomb = tmp_path / "merges.txt"
    bomb.write_bytes(gzip.compress(b"\0" * (100 << 20), compresslevel=1))
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="larger than a BPE table can be .* once unpacked"):
            bpe.read_merges(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bpe.MAX_TABLE_BYTES + (8 << 20)
    table = tmp_path / "table.txt.gz"
    table.write_bytes(gzip.compress(b"#version: 0.2\na b\nab c\n"))
    assert bpe.read_merges(table) == ["a b", "ab c", ""]
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(gzip.compress(("#version: 0.2\n" + "".join(f"a{i} b{i}\n" for i in range(5000))).encode())[:-200])
    with pytest.raises(ValueError, match="cut short"):
        bpe.read_merges(cut)
