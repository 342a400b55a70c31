"""The default install has no torch and no open_clip (they are the `torch` extra). Each test runs imgsearch in a
fresh process where importing torch, torchvision, open_clip, transformers or onnx fails, as on such an install:
indexing, text and image queries, tags, scores, eval and the web page work from the exports made straight from
the checkpoint's tensors; what needs torch says so in one line naming the extra."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Runs each argv of sys.argv[1] (JSON) through the CLI in this one process, torch & co. unimportable, and prints
# [exit code, stdout, stderr] per command as JSON. sys.argv[2] (JSON): extra HUB_TAGS entries, as
# [[name, tag, repo], ...]. sys.argv[3]: a query the web page runs at the end ("" for none). Environment:
# FASTER_TOWER (int8, or fp32) is the tower the parity pass times faster; TEST_SYS_PATH goes before sys.path.
DRIVER = r"""
import json, os, sys
startup = set(sys.modules)  # the interpreter's own (site, .pth hooks): not imgsearch's imports
for m in ("torch", "torchvision", "open_clip", "transformers", "onnx"):
    sys.modules[m] = None
sys.path[:0] = [p for p in [os.environ.get("TEST_SYS_PATH")] if p]
from imgsearch import modelspec, onnx_image
for name, tag, repo in json.loads(sys.argv[2]):
    modelspec.HUB_TAGS[(name, tag)] = repo
real_parity = onnx_image.int8_parity
def parity(enc, tensors):  # the tiny model's two towers are too close to time: one is made the faster
    cos, feats, speeds = real_parity(enc, tensors)
    return cos, feats, {k: 2.0 if k.endswith(os.environ.get("FASTER_TOWER", "int8")) else 1.0 for k in speeds}
onnx_image.int8_parity = parity
from typer.testing import CliRunner
from imgsearch.cli import app
out = []
for argv in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, argv)
    try:
        err = r.stderr
    except ValueError:
        err = ""
    if r.exception and not isinstance(r.exception, SystemExit):
        err += f"EXCEPTION {type(r.exception).__name__}: {r.exception}"
    out.append([r.exit_code, r.stdout, err])
if sys.argv[3]:
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(os.path.join(sys.argv[4], "imgsearch", "ui", "app.py"), default_timeout=60)
    at.query_params["q"] = sys.argv[3]
    at.run()
    names = [c.replace("\\", "").split(" · ", 1)[1] for img in at.image for c in img.captions if " · " in c]
    out.append([bool(at.exception), names, [str(e.value) for e in at.error]])
assert not any(m in sys.modules and sys.modules[m] is not None for m in ("torch", "open_clip"))
print("MODULES:" + json.dumps(sorted({n.split(".")[0] for n, v in list(sys.modules.items())
                                      if v is not None and n not in startup})))
print("RESULT:" + json.dumps(out))
"""


def _run(home: Path, commands: list[list[str]], hub: list | None = None, page_query: str = "",
         env: dict | None = None, modules: list | None = None) -> list:
    full = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    full.update(PYTHONPATH=str(ROOT), IMGSEARCH_HOME=str(home), IMGSEARCH_WORKERS="2", **(env or {}))
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands), json.dumps(hub or []), page_query,
                           str(ROOT)], env=full, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT:"))
    if modules is not None:  # the top-level modules the process imported
        modules += json.loads(next(x for x in done.stdout.splitlines() if x.startswith("MODULES:"))[8:])
    return json.loads(line[len("RESULT:"):])


def _all_from_the_default_install(imported: list[str]) -> None:
    """Every imported module that an installed distribution provides (the others: the standard library, this
    checkout, names packages register at run time) comes with the default install."""
    import importlib.metadata as metadata
    import re

    owners = metadata.packages_distributions()
    default = _default_install()
    assert not {"torch", "torchvision", "open-clip-torch", "onnx"} & default
    outside = {m: owners[m] for m in imported if m in owners and m != "imgsearch"
               and not any(re.sub(r"[-_.]+", "-", d).lower() in default for d in owners[m])}
    assert not outside, outside


def _default_install() -> set[str]:
    """The distributions `pip install .` brings: pyproject's dependencies and theirs, no extras (read from the
    metadata of what is installed here)."""
    import importlib.metadata as metadata
    import re
    import tomllib

    from packaging.requirements import Requirement

    todo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    seen: set[str] = set()
    while todo:
        req = Requirement(todo.pop())
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += metadata.requires(req.name) or []
    return seen


def _merges_txt(path: Path) -> None:
    """CLIP's BPE merges in the Hugging Face merges.txt layout (a version line, then one merge per line)."""
    from imgsearch.bpe import read_merges

    gz = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    path.write_text("#version: 0.2\n" + "\n".join(read_merges(gz)) + "\n", encoding="utf-8")


@pytest.fixture()
def model_dir(tiny_model, tmp_path) -> Path:
    """The tiny model as a local-dir folder with a merges.txt (no open_clip to read CLIP's BPE from)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        (folder / name).symlink_to(tiny_model / name)
    _merges_txt(folder / "merges.txt")
    return folder


def _ok(result) -> str:
    code, out, err = result
    assert code == 0, (out + err)[-2000:]
    return out


def _one_line_error(result, *parts: str) -> str:
    code, out, err = result
    text = (out + err).strip()
    assert code != 0 and "Traceback" not in text and "EXCEPTION" not in text, text[-2000:]
    line = next(x for x in text.splitlines() if x.startswith("error:"))
    assert all(p in line for p in parts), line
    return line


def test_without_torch_index_queries_tags_eval_and_the_page_work_and_torch_only_paths_name_the_extra(
        model_dir, photos, tmp_path):
    """... and everything those commands imported comes with the default install (pyproject's dependencies
    and theirs), so the blocked imports here stand for a real `pip install .` without the torch extra."""
    model = ["--model", f"local-dir:{model_dir}"]
    red = str(photos / "red_circle_000.jpg")
    classes = tmp_path / "classes"
    for colour in ("red", "blue"):
        (classes / colour).mkdir(parents=True)
        for p in photos.glob(f"{colour}_*.jpg"):
            (classes / colour / p.name).symlink_to(p)
    captions = tmp_path / "captions.csv"
    captions.write_text(f"path,caption\n{red},a red circle\n")
    results = _run(tmp_path / "home", [
        model + ["index", str(photos), "--json"],
        model + ["query", "a red circle", "-k", "3", "--json"],
        model + ["query", "--image", red, "-k", "3", "--json"],
        model + ["classify", str(photos / "blue_square_001.jpg"), "--labels", "red,blue,green"],
        model + ["score", red, "a red circle", "a blue square"],
        model + ["eval", "zeroshot", str(classes), "--json"],
        model + ["index", str(photos), "--json"],  # a later run: nothing new, no second parity check
        model + ["--precision", "bf16", "index", str(photos)],
        model + ["finetune", str(captions), "--out", str(tmp_path / "tuned")],
        model + ["--device", "cuda", "index", str(photos)],
    ], page_query="a red circle", env={"IMGSEARCH_MODEL": f"local-dir:{model_dir}"},  # the page's model
        modules=(imported := []))
    index, text, image, classify, score, zeroshot, again, bf16, finetune, cuda, page = results

    report = json.loads(_ok(index))
    # auto without torch: int8 on onnxruntime, checked against the fp32 export on these photos
    assert report["new"] == 54 and report["image_tower"] == "onnxruntime int8"
    assert report["int8_parity"] >= 0.99 and report["parity_images"] > 0
    hits = [Path(h["path"]).name for h in json.loads(_ok(text))]
    assert all(n.startswith("red_circle") for n in hits), hits
    hits = [Path(h["path"]).name for h in json.loads(_ok(image))]
    assert hits[0] == "red_circle_000.jpg" and all(n.startswith("red_circle") for n in hits), hits
    assert _ok(classify).split("\t")[1].split()[0] == "blue"
    lines = _ok(score).splitlines()[1:]
    assert lines[0].endswith("a red circle") and float(lines[0].split()[0]) > float(lines[1].split()[0])
    assert json.loads(_ok(zeroshot))["models"][0]["top1"] >= 0.9  # chance: 0.5
    again = json.loads(_ok(again))
    assert again["unchanged"] == 54 and again["parity_images"] == 0
    for result in (bf16, finetune, cuda):
        _one_line_error(result, "needs torch and open_clip", "pip install 'imgsearch[torch]'")
    assert not (tmp_path / "tuned").exists()
    crashed, names, errors = page
    assert not crashed and not errors and names[0].startswith("red_circle"), (names[:5], errors)
    _all_from_the_default_install(imported)
    assert {"onnxruntime", "numpy", "PIL", "streamlit"} <= set(imported)  # the check saw the real imports


def test_where_int8_is_too_far_auto_indexes_on_the_fp32_export_and_remembers_it(model_dir, photos, tmp_path):
    model = ["--model", f"local-dir:{model_dir}"]
    more = tmp_path / "more"
    more.mkdir()
    Image.new("RGB", (96, 96), (200, 40, 30)).save(more / "another.jpg")
    first, second = _run(tmp_path / "home", [model + ["index", str(photos), "--json"],
                                             model + ["index", str(more), "--json"]],
                         env={"IMGSEARCH_INT8_MIN_COSINE": "1.0"})  # no int8 graph clears 1.0
    assert "int8 is too far from fp32 on your images" in first[2] and "onnxruntime fp32" in first[2]
    first = json.loads(_ok(first))
    assert first["new"] == 54 and first["image_tower"] == "onnxruntime fp32"
    second = json.loads(_ok(second))
    # the failure is remembered: not measured again
    assert second["new"] == 1 and second["image_tower"] == "onnxruntime fp32" and second["parity_images"] == 0


def _fake_hub(root: Path, repo: str, model_dir: Path, tokenizer_json: bool = False) -> Path:
    """A Hugging Face cache holding ``repo`` as the hub lays it out (refs/main -> a snapshot folder), with
    CLIP's BPE merges as merges.txt, or only inside a tokenizer.json (newer files: [a, b] pairs)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / sha
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(sha)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        (snap / name).write_bytes((model_dir / name).read_bytes())
    lines = (model_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    if tokenizer_json:
        merges = [line.split(" ") for line in lines if line]
        (snap / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": merges}}))
    else:
        (snap / "merges.txt").write_text((model_dir / "merges.txt").read_text(encoding="utf-8"))
    return root


def test_a_pretrained_tag_is_fetched_from_its_hub_repo_without_open_clip(model_dir, photos, tmp_path):
    hub = _fake_hub(tmp_path / "hf", "imgsearch-test/tiny", model_dir)
    _fake_hub(hub, "imgsearch-test/tiny-tok", model_dir, tokenizer_json=True)
    tag = ["--model", "tiny-vit", "--pretrained", "test_tag"]
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    hub_name = ["--model", "hf-hub:imgsearch-test/tiny-tok"]  # merges from its tokenizer.json
    index, query, unknown, default, by_name, by_name_query, missing = _run(tmp_path / "home", [
        tag + ["index", str(photos), "--json"],
        tag + ["query", "a red circle", "-k", "3", "--json"],
        ["--model", "tiny-vit", "--pretrained", "other_tag", "index", str(photos)],
        ["index", str(photos)],  # the default model: not in this cache, and the hub is offline
        hub_name + ["index", str(photos), "--json"],  # the same repo by name: a model of its own in the library
        hub_name + ["query", "a red circle", "-k", "3", "--json"],
        ["--model", "hf-hub:imgsearch-test/absent", "index", str(photos)],
    ], hub=[["tiny-vit", "test_tag", "imgsearch-test/tiny"]], env=env, modules=(imported := []))
    _all_from_the_default_install(imported)
    assert "huggingface_hub" in imported
    report = json.loads(_ok(index))
    assert report["new"] == 54 and report["model"] == "tiny-vit (test_tag)"
    hits = [Path(h["path"]).name for h in json.loads(_ok(query))]
    assert all(n.startswith("red_circle") for n in hits), hits
    _one_line_error(unknown, "model tiny-vit (other_tag) needs torch and open_clip", "pip install 'imgsearch[torch]'",
                    "or use --pretrained test_tag")
    _one_line_error(default, "cannot get the weights of ViT-B-32 (laion2b_s34b_b79k)",
                    "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "connect to the internet once")
    report = json.loads(_ok(by_name))
    assert report["encoded"] == 54 and report["model"] == "hf-hub:imgsearch-test/tiny-tok"
    hits = [Path(h["path"]).name for h in json.loads(_ok(by_name_query))]
    assert all(n.startswith("red_circle") for n in hits), hits
    _one_line_error(missing, "hf-hub:imgsearch-test/absent", "connect to the internet once")


def test_a_hub_merges_txt_or_tokenizer_json_gives_the_tables_open_clips_bpe_file_gives(tmp_path):
    from imgsearch.bpe import write_tables

    gz = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    _merges_txt(tmp_path / "merges.txt")
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"merges": [m for m in merges if m]}}))
    for name, source in (("a", gz), ("b", tmp_path / "merges.txt"), ("c", tmp_path / "tokenizer.json")):
        (tmp_path / name).mkdir()
        write_tables(source, tmp_path / name)
    for table in ("bpe_merges.txt", "bpe_vocab.txt"):
        assert (tmp_path / "a" / table).read_bytes() == (tmp_path / "b" / table).read_bytes() == \
            (tmp_path / "c" / table).read_bytes()


def test_an_imported_library_answers_text_and_image_queries_without_torch(model_dir, photos, tmp_path):
    """A fresh home filled by `import` has no exports yet: the first query makes them from the weights (no
    torch), and the text export says it was checked against numpy, never that torch checked it."""
    model = ["--model", f"local-dir:{model_dir}"]
    a, b, out = ["--home", str(tmp_path / "a")], ["--home", str(tmp_path / "b")], tmp_path / "vectors"
    red = str(photos / "red_circle_000.jpg")
    index, export, imported, text, image = _run(tmp_path / "unused", [
        a + model + ["index", str(photos), "--quiet"],
        a + model + ["export", str(out)],
        b + model + ["import", str(out)],
        b + model + ["query", "a red circle", "-k", "3", "--json"],
        b + model + ["query", "--image", red, "-k", "3", "--json"],
    ])
    for result in (index, export, imported):
        _ok(result)
    hits = [Path(h["path"]).name for h in json.loads(_ok(text))]
    assert all(n.startswith("red_circle") for n in hits), hits
    hits = [Path(h["path"]).name for h in json.loads(_ok(image))]
    assert hits[0] == "red_circle_000.jpg", hits
    manifest = next((tmp_path / "b" / "exports").glob("*/text/manifest.json"))
    meta = json.loads(manifest.read_text())
    assert meta["verified"] and meta["checked"] == "numpy"


def test_a_model_folder_imgsearch_wrote_serves_as_it_is_and_eval_retrieval_runs_on_the_exports(
        random_tiny_model, photos, tmp_path):
    """A folder `save_local_dir` wrote (`finetune`, the demo model) holds CLIP's BPE table as merges.txt, so the default
    install, with no open_clip to provide it, indexes with it unchanged (it said "needs torch"); `eval retrieval`
    encodes as `eval zeroshot` does (it loaded torch); `eval parity`, whose reference is open_clip's, names itself
    before making exports; an index run that timed the fp32 export faster reports no int8 figure as its own."""
    model = ["--model", f"local-dir:{random_tiny_model}"]
    captions = tmp_path / "captions.csv"
    captions.write_text("path,caption\n" + "".join(f"{p},a {p.stem.rsplit('_', 1)[0].replace('_', ' ')}\n"
                                                   for p in sorted(photos.glob("*.jpg"))[:12]))
    index, retrieval, parity = _run(tmp_path / "home", [
        model + ["index", str(photos)],
        model + ["eval", "retrieval", str(captions), "--json"],
        model + ["eval", "parity", str(photos)],
    ], env={"FASTER_TOWER": "fp32"})
    out = _ok(index)
    assert "new 54," in out and "image tower: onnxruntime fp32" in out and "min cosine" not in out, out
    assert json.loads(_ok(retrieval))["models"][0]["images"] == 12
    _one_line_error(parity, "eval parity needs torch and open_clip", "pip install 'imgsearch[torch]'")


def test_ctrl_c_while_onnxruntime_loads_stops_the_run_like_any_ctrl_c(model_dir, photos, tmp_path):
    """pybind11 turns a Ctrl-C during onnxruntime's extension set-up into ImportError("initialization failed"); it
    was taken for a missing onnxruntime, and the run ended (exit 1) saying it needs torch."""
    fake = tmp_path / "fake" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('initialization failed') from KeyboardInterrupt()\n")
    (index,) = _run(tmp_path / "home", [["--model", f"local-dir:{model_dir}", "index", str(photos)]],
                    env={"TEST_SYS_PATH": str(tmp_path / "fake")})
    code, out, err = index
    assert code == 130 and "interrupted" in err and "needs torch" not in err, (out + err)[-2000:]


def test_a_model_only_open_clip_loads_or_a_mistyped_folder_gets_one_line_at_every_door(model_dir, photos, tmp_path):
    """The same model got a different line from each command: index "needs torch (weights fingerprint needs
    open_clip)", query "needs weights (e.g. laion2b_s34b_b79k)", a ViT-B-32 tag that is not ViT-B-16's, or "this
    model needs torch"; a mistyped local-dir folder, or one with a damaged config, "has a Hugging Face text tower
    ... imgsearch[multilingual]"."""
    red, absent, damaged = str(photos / "red_circle_000.jpg"), tmp_path / "no-such-model", tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "open_clip_model.safetensors").symlink_to(model_dir / "open_clip_model.safetensors")
    (damaged / "open_clip_config.json").write_text('{"model_cfg": ')
    doors = [["index", str(photos)], ["query", "a red circle"], ["query", "--image", red], ["score", red, "red"]]
    cases = {("--model", "convnext_base"): ("model convnext_base needs torch and open_clip",
                                            "pip install 'imgsearch[torch]'"),
             ("--model", "ViT-B-32", "--pretrained", "openai"): ("model ViT-B-32 (openai) needs torch and open_clip",
                                                                 "or use --pretrained laion2b_s34b_b79k"),
             ("--model", "ViT-B-16"): ("model ViT-B-16 needs weights", "e.g. laion2b_s34b_b88k"),
             ("--model", f"local-dir:{absent}"): (f"model folder {absent} does not exist",)}
    results = _run(tmp_path / "home", [["--model", f"local-dir:{model_dir}", "index", str(photos), "--quiet"]]
                   + [list(model) + door for model in cases for door in doors]
                   + [["--home", str(tmp_path / "other"), "--model", f"local-dir:{damaged}", "score", red, "red"]])
    _ok(results[0])  # a library to query
    line = _one_line_error(results.pop(), "no readable open_clip config")
    assert "multilingual" not in line, line
    for i, parts in enumerate(cases.values()):
        for door, result in zip(doors, results[1 + i * len(doors):]):
            line = _one_line_error(result, *parts)
            assert "multilingual" not in line, (door, line)


def test_a_model_with_a_hugging_face_text_tower_names_the_extra_that_loads_it(photos, tmp_path):
    """The torch extra alone has no transformers: it was the extra named, under a list of hub tags."""
    (index,) = _run(tmp_path / "home", [["--model", "multilingual", "index", str(photos)]])
    line = _one_line_error(index, "xlm-roberta-base-ViT-B-32 (laion5b_s13b_b90k) has a Hugging Face text tower",
                           "pip install 'imgsearch[multilingual]'")
    assert "imgsearch[torch]" not in line and "tags fetched" not in line


def test_eval_without_a_library_keeps_its_exports_in_this_users_cache(model_dir, photos, tmp_path):
    """Not in a fixed folder of the shared temp dir, which another user may own (eval then failed: "needs torch")
    or fill with exports of their making."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    (shared / "imgsearch-eval-exports").write_text("another user's")
    classes = tmp_path / "classes"
    for colour in ("red", "blue"):
        (classes / colour).mkdir(parents=True)
        for p in photos.glob(f"{colour}_*.jpg"):
            (classes / colour / p.name).symlink_to(p)
    (zeroshot,) = _run(tmp_path / "no-library", [
        ["--model", f"local-dir:{model_dir}", "eval", "zeroshot", str(classes), "--json"]],
        env={"TMPDIR": str(shared), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert json.loads(_ok(zeroshot))["models"][0]["top1"] >= 0.9
    assert list((tmp_path / "cache" / "imgsearch" / "eval-exports").glob("exports/*/image/manifest.json"))
    assert not (tmp_path / "no-library").exists()


def test_score_and_classify_of_files_without_a_library_make_no_library_folder(model_dir, photos, tmp_path):
    """`score` and `classify FILES` need no library; without torch they made the exports inside the home, so the
    default library folder appeared (holding only exports/) for a command that does not touch it."""
    red, blue = str(photos / "red_circle_000.jpg"), str(photos / "blue_square_001.jpg")
    score, classify = _run(tmp_path / "no-library", [
        ["--model", f"local-dir:{model_dir}", "score", red, "a red circle", "a blue square"],
        ["--model", f"local-dir:{model_dir}", "classify", red, blue, "--labels", "red,blue,green"]],
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    lines = _ok(score).splitlines()[1:]
    assert lines[0].endswith("a red circle") and float(lines[0].split()[0]) > float(lines[1].split()[0])
    assert [line.split("\t")[1].split()[0] for line in _ok(classify).splitlines()] == ["red", "blue"]
    assert not (tmp_path / "no-library").exists()
    assert list((tmp_path / "cache" / "imgsearch" / "eval-exports").glob("exports/*/image/manifest.json"))
