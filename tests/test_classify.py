"""Zero-shot classification (prompt ensembles, stored tags, --tag filter) and CLIP score, end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from imgsearch import synthetic, zeroshot

COLOURS = list(synthetic.COLORS)


def colour_of(path: str) -> str:
    return Path(path).stem.split("_")[0]


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture()
def encoder(tiny_model):
    from imgsearch.encoder import ModelSpec, load

    return load(ModelSpec(f"local-dir:{tiny_model}"), "cpu", "fp32")


# --- library classification -------------------------------------------------------------------------
def test_classify_library_stores_tags_that_query_filters_on(cli, photos):
    assert cli("index", photos).exit_code == 0
    report = ok_json(cli("classify", "--labels", ",".join(COLOURS), "--json"))
    assert report["images"] == 54 and report["tagged"] == 54
    right = sum(r["labels"][0]["label"] == colour_of(r["path"]) for r in report["results"])
    assert right >= 48, right  # the tiny model is sure of colours (chance: 9 of 54)
    assert all(0.0 < r["labels"][0]["prob"] <= 1.0 for r in report["results"])

    counts = {t["tag"]: t["images"] for t in ok_json(cli("tags", "--json"))}
    assert sum(counts.values()) == 54 and set(counts) <= set(COLOURS)
    table = cli("tags").stdout.splitlines()
    assert table[0].split()[1] == max(counts, key=counts.get)

    # --tag filters inside the vector search: asking for more than exist returns exactly the tagged ones.
    hits = ok_json(cli("query", "a circle", "--tag", "red", "-k", "54", "--json"))
    red_ids = {r["id"] for r in report["results"] if r["labels"][0]["label"] == "red"}
    assert {h["id"] for h in hits} == red_ids
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert cli("query", "a circle", "--tag", "RED", "-k", "54", "--json").stdout == cli(
        "query", "a circle", "--tag", "red", "-k", "54", "--json").stdout  # tags match case-insensitively

    sets = ok_json(cli("tags", "--sets", "--json"))
    assert len(sets) == 1 and sets[0]["labels"] == COLOURS and sets[0]["model"].startswith("local-dir:")
    assert sets[0]["templates"] == list(zeroshot.DEFAULT_TEMPLATES) and sets[0]["images"] == 54


def test_reclassify_replaces_same_set_and_keeps_other_sets(cli, photos):
    cli("index", photos)
    first = ok_json(cli("classify", "--labels", "circle,square,triangle", "--json"))
    again = ok_json(cli("classify", "--labels", "circle,square,triangle", "--json"))
    assert again["set"] == first["set"]
    assert sum(t["images"] for t in ok_json(cli("tags", "--json"))) == 54  # not doubled
    cli("classify", "--labels", "red,blue", "--top", "2", "--under", str(photos))
    sets = ok_json(cli("tags", "--sets", "--json"))
    assert [s["labels"] for s in sets] == [["circle", "square", "triangle"], ["red", "blue"]]
    counts = {t["tag"]: t["images"] for t in ok_json(cli("tags", "--json"))}
    assert counts["red"] == counts["blue"] == 54  # --top 2 of 2 labels: every image gets both
    for wrong in ("9" * 23, "0"):  # past SQLite's integers was an internal error (OverflowError)
        r = cli("tags", "--drop-set", wrong)
        assert r.exit_code == 2 and "Invalid value for '--drop-set'" in r.output, r.output
    r = cli("tags", "--drop-set", str(sets[1]["id"]))
    assert r.exit_code == 0
    assert {t["tag"] for t in ok_json(cli("tags", "--json"))} <= {"circle", "square", "triangle"}


def test_the_same_labels_and_templates_in_another_order_reuse_their_set(cli, photos):
    """`--labels a,b,c` then `--labels c,b,a` made a second, identical set: `tags --sets` listed both and
    `tags` counted every image twice."""
    cli("index", photos)
    tpl = ["--template", "a {} shape", "--template", "{}"]
    first = ok_json(cli("classify", "--labels", "circle,square,triangle", *tpl, "--json"))
    again = ok_json(cli("classify", "--labels", "triangle,circle,square", *tpl[2:], *tpl[:2], "--json"))
    assert again["set"] == first["set"] and again["labels"] == ["triangle", "circle", "square"]
    sets = ok_json(cli("tags", "--sets", "--json"))
    assert [(s["labels"], s["templates"]) for s in sets] == [(["circle", "square", "triangle"], ["a {} shape", "{}"])]
    assert sum(t["images"] for t in ok_json(cli("tags", "--json"))) == 54  # not doubled
    other = ok_json(cli("classify", "--labels", "triangle,circle", *tpl, "--json"))  # fewer labels: another set
    assert other["set"] != first["set"] and len(ok_json(cli("tags", "--sets", "--json"))) == 2


def test_top_and_min_prob(cli, photos):
    cli("index", photos)
    report = ok_json(cli("classify", "--labels", ",".join(COLOURS), "--top", "3", "--min-prob", "0.2", "--json"))
    for r in report["results"]:
        probs = [lab["prob"] for lab in r["labels"]]
        assert 1 <= len(probs) <= 3 and all(p >= 0.2 for p in probs)
        assert probs == sorted(probs, reverse=True)


def test_custom_templates_and_templates_file(cli, photos, tmp_path):
    cli("index", photos)
    r = ok_json(cli("classify", "--labels", "red,green", "--template", "a {} shape", "--template", "{}", "--json"))
    assert r["templates"] == ["a {} shape", "{}"]
    f = tmp_path / "templates.txt"
    f.write_text("# satellite style\na satellite photo of {}.\n\na {} thing\n", encoding="utf-8")
    r = ok_json(cli("classify", "--labels", "red,green", "--templates-file", f, "--json"))
    assert r["templates"] == ["a satellite photo of {}.", "a {} thing"]
    assert len(ok_json(cli("tags", "--sets", "--json"))) == 2  # different templates: a different set


def test_classify_files_leaves_library_alone(cli, tmp_path, home):
    folder = tmp_path / "loose"
    samples = synthetic.generate(folder, per_class=1, colors=["red", "blue", "green"], shapes=["circle"], size=96,
                                 fmt="png", seed=4, captions_file=None)
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("red circle\nblue circle\ngreen circle\n", encoding="utf-8")
    r = cli("classify", *[s.path for s in samples], "--labels-file", labels_file)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for s, line in zip(samples, lines):
        path, labels = line.split("\t")
        assert path == s.path and labels.startswith(f"{s.color} circle ")
    out = ok_json(cli("classify", str(folder), "--labels", "red circle,blue circle", "--top", "2", "--json"))
    assert len(out) == 3 and all(len(o["labels"]) == 2 for o in out)
    assert not (home / "library.db").exists()


@pytest.mark.parametrize("args, code, message", [
    (["--labels", " , "], 2, "no labels given"),
    (["--labels", "dog"], 2, "give at least two"),
    (["--labels", "dog,Dog"], 2, "given twice"),
    ([], 2, "give --labels"),
    (["--labels", "a,b", "--labels-file", "x.txt"], 2, "not both"),
    (["--labels-file", "missing-labels.txt"], 1, "labels file not found: missing-labels.txt"),
    (["--labels", "a,b", "--template", "a photo"], 2, "must contain {} exactly once"),
    (["--labels", "a,b", "--templates-file", "nope.txt"], 1, "templates file not found"),
    (["nope.jpg", "--labels", "a,b"], 2, "image not found: nope.jpg"),
])
def test_bad_classify_inputs_give_one_line_errors(cli, args, code, message):
    r = cli("classify", *args)
    assert r.exit_code == code, r.output
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_empty_labels_file_and_empty_library(cli, tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("# nothing but a comment\n\n", encoding="utf-8")
    r = cli("classify", "--labels-file", f)
    assert r.exit_code == 1 and "no labels given" in r.stderr
    r = cli("classify", "--labels", "a,b")
    assert r.exit_code == 1 and "imgsearch index" in r.stderr


def test_a_labels_file_with_a_huge_line_is_refused_in_one_line(cli, tmp_path):
    """A wrong file given as --labels-file (one 10 MB line) became a label: encoded 10 times, stored as a tag
    and its label set, and printed in full by classify and `tags`."""
    f = tmp_path / "labels.txt"
    f.write_bytes("\ufeffdog\n\n".encode() + b"x" * 10_000_000 + b"\ncat\n")
    r = cli("classify", "--labels-file", f)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == (f"error: labels file {f}: a label of 10,000,000 characters ('{'x' * 40}'...); a label is "
                        "a few words, at most 1000 characters\n")
    r = cli("classify", "--labels", "a,b", "--template", "a photo of {} " + "y" * 1000)
    assert r.exit_code == 2 and "a template of 1,014 characters" in r.stderr


def test_unreadable_file_is_reported_and_others_still_labelled(cli, tmp_path):
    good = tmp_path / "red.png"
    synthetic.draw_shape("red", "circle", 96, random.Random(1)).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not really a jpeg")
    r = cli("classify", good, bad, "--labels", "red circle,blue square")
    assert r.exit_code == 1
    assert r.stdout.startswith(str(good)) and "red circle" in r.stdout
    assert "broken.jpg" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- ensembles ----------------------------------------------------------------------------------------
def test_label_embedding_is_normalised_mean_of_prompt_embeddings(encoder):
    templates = ["a photo of a {}.", "a {} shape", "{}"]
    got = zeroshot.label_embeddings(encoder, ["red circle", "blue square"], templates)
    assert got.shape == (2, encoder.dim)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    texts = zeroshot.prompts("blue square", templates)
    assert texts == ["a photo of a blue square.", "a blue square shape", "blue square"]
    mean = encoder.encode_texts(texts).mean(axis=0)
    assert np.allclose(got[1], mean / np.linalg.norm(mean), atol=1e-5)
    # A single template is just that prompt's embedding.
    one = zeroshot.label_embeddings(encoder, ["red circle", "blue square"], ["a {} shape"])
    assert np.allclose(one[0], encoder.encode_texts(["a red circle shape"])[0], atol=1e-5)


def test_classify_probabilities():
    labels = np.eye(3, dtype=np.float32)
    images = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.98]], dtype=np.float32)
    p = zeroshot.classify(images, labels, 100.0)
    assert np.allclose(p.sum(axis=1), 1.0) and list(p.argmax(axis=1)) == [0, 2]
    soft = zeroshot.classify(images, labels, 1.0)
    assert soft.max() < p.max()  # a lower logit scale spreads the probability
    assert zeroshot.top_labels(p, ["a", "b", "c"], top=2, min_prob=0.0)[0][0][0] == "a"
    assert zeroshot.top_labels(p, ["a", "b", "c"], top=3, min_prob=0.5) == [[("a", pytest.approx(p[0, 0]))],
                                                                             [("c", pytest.approx(p[1, 2]))]]


def test_ensemble_does_not_hurt_and_labels_match_known_shapes(encoder):
    rng = random.Random(5)
    imgs, classes, shapes = [], [], []
    for colour in COLOURS:
        for shape in synthetic.SHAPES:
            for _ in range(4):
                imgs.append(synthetic.draw_shape(colour, shape, 96, rng))
                classes.append(f"{colour} {shape}")
                shapes.append(shape)
    vecs = encoder.encode_images(imgs)

    def accuracy(labels, truth, templates):
        probs = zeroshot.classify(vecs, zeroshot.label_embeddings(encoder, labels, templates), encoder.logit_scale)
        return float(np.mean([labels[j] == t for j, t in zip(probs.argmax(axis=1), truth)]))

    class_labels = [f"{c} {s}" for c in COLOURS for s in synthetic.SHAPES]
    ens = accuracy(class_labels, classes, zeroshot.DEFAULT_TEMPLATES)
    single = accuracy(class_labels, classes, zeroshot.SINGLE_TEMPLATE)
    assert ens >= single - 0.03, (ens, single)
    assert ens >= 0.75, ens  # 18 classes: chance is 0.06
    shape_ens = accuracy(list(synthetic.SHAPES), shapes, zeroshot.DEFAULT_TEMPLATES)
    shape_single = accuracy(list(synthetic.SHAPES), shapes, zeroshot.SINGLE_TEMPLATE)
    assert shape_ens >= shape_single - 0.03, (shape_ens, shape_single)
    assert shape_ens > 0.5, shape_ens  # most images get their shape (chance 0.33)


# --- CLIP score ---------------------------------------------------------------------------------------
def test_score_ranks_matching_caption_highest_outside_library(cli, tmp_path, home):
    img = tmp_path / "elsewhere" / "red.jpg"
    img.parent.mkdir()
    synthetic.draw_shape("red", "circle", 128, random.Random(2)).save(img, quality=90)
    texts = ["a blue square", "a red circle", "a green triangle"]
    out = ok_json(cli("score", img, *texts, "--json"))
    scores = {s["text"]: s for s in out["scores"]}
    assert [s["text"] for s in out["scores"]] == texts  # in the order given
    assert max(scores, key=lambda t: scores[t]["cosine"]) == "a red circle"
    for s in out["scores"]:
        assert -1.0 <= s["cosine"] <= 1.0
        assert s["clipscore"] == pytest.approx(100 * max(s["cosine"], 0.0), abs=1e-3)
    table = cli("score", img, *texts)
    assert table.exit_code == 0
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["cosine", "clipscore", "text"] and rows[2].endswith("a red circle")
    assert not (home / "library.db").exists()


def test_score_bad_inputs(cli, tmp_path):
    r = cli("score", tmp_path / "missing.jpg", "a cat")
    assert r.exit_code == 2 and "image not found" in r.stderr
    r = cli("score", "a" * 5000, "a cat")  # a name too long to stat (was an internal error)
    assert r.exit_code == 2 and r.stderr.strip() == "error: image not found: " + "a" * 300
    r = cli("eval", "parity", tmp_path / ("b" * 5000))
    assert r.exit_code == 2 and r.stderr.strip().endswith(" does not exist") and len(r.stderr) < 400, r.stderr
    bad = tmp_path / "bad.png"
    bad.write_text("hello", encoding="utf-8")
    r = cli("score", bad, "a cat")
    assert r.exit_code == 2 and "cannot use query image" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    good = tmp_path / "ok.png"
    synthetic.draw_shape("red", "circle", 64, random.Random(1)).save(good)
    r = cli("score", good, "  ")
    assert r.exit_code == 2 and "non-empty text" in r.stderr


def test_score_and_classify_encode_texts_in_the_query_language(cli, photos, home, tiny_model, monkeypatch):
    """--lang (and the library's recorded language) reaches every text a library encodes: a query's, a score's,
    a classification's labels, a loose file's labels; an NLLB tower reads the language as a token, so a label
    tokenized as English would not match the same words in a query. Without --lang, the language recorded
    when the library was indexed is every text's default (loose files' labels went without it: English)."""
    from imgsearch import Library, textfast
    from imgsearch.encoder import Encoder

    assert cli("index", photos).exit_code == 0
    seen = []
    for cls in (textfast._Tower, Encoder):
        real = cls.encode_texts

        def spy(self, texts, lang=None, default_lang=None, _real=real):
            seen.append((lang, default_lang))
            return _real(self, texts, lang, default_lang)

        monkeypatch.setattr(cls, "encode_texts", spy)
    photo = str(sorted(photos.glob("red_circle_*"))[0])

    def every_door(lib):
        seen.clear()
        lib.search("ein roter Kreis")
        lib.score(photo, ["ein roter Kreis"])
        lib.classify(["rot", "blau"])
        lib.classify_files([photo], ["rot", "blau"])
        return seen

    with Library(home, f"local-dir:{tiny_model}", lang="deu_Latn") as lib:
        assert len(every_door(lib)) >= 4 and {lang for lang, _ in seen} == {"deu_Latn"}, seen
        lib.index(photos)  # records the language with the library
    with Library(home, f"local-dir:{tiny_model}") as lib:
        assert len(every_door(lib)) >= 4 and {default for _, default in seen} == {"deu_Latn"}, seen
