"""One request type: a wrong value gets the same refusal, naming the field, at every door (Python API, the
server's JSON and URL parameters, the web UI's URL, the CLI)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from imgsearch import Library
from imgsearch.errors import ParamError, UsageError
from imgsearch.request import MAX_TERMS, SearchRequest

# (field, Python keywords, JSON body, URL parameters, CLI arguments)
BAD = [
    ("k", {"k": 0}, {"texts": ["x"], "k": 0}, {"q": "x", "k": "0"}, ["x", "-k", "0"]),
    ("min_score", {"min_score": math.nan}, {"texts": ["x"], "min_score": 2}, {"q": "x", "min_score": "nan"},
     ["x", "--min-score", "nan"]),
    ("under", {"under": "/tmp/a\x00b"}, {"texts": ["x"], "under": "/tmp/a\x00b"}, {"q": "x", "under": "/tmp/a\x00b"},
     None),  # argv cannot carry a NUL
    ("ids", {"ids": [2 ** 70]}, {"texts": ["x"], "ids": [2 ** 70]}, {"q": "x", "id": str(2 ** 70)}, None),
    ("blend", {"blend": 0.5}, {"texts": ["x"], "blend": 0.5}, {"q": "x", "blend": "0.5"}, ["x", "--blend", "0.5"]),
    ("blend", {"keyword": "x", "blend": math.nan}, {"texts": ["x"], "keyword": "x", "blend": 1.5},
     {"q": "x", "keyword": "x", "blend": "nan"}, ["x", "--keyword", "x", "--blend", "nan"]),
    ("after", {"after": "not a date"}, {"texts": ["x"], "after": "not a date"}, {"q": "x", "after": "not a date"},
     ["x", "--after", "not a date"]),
    ("texts", {"text": ["x"] * (MAX_TERMS + 1)}, {"texts": ["x"] * (MAX_TERMS + 1)}, {"q": ["x"] * (MAX_TERMS + 1)},
     ["x"] * (MAX_TERMS + 1)),
]


def _refusal(fn) -> ParamError:
    with pytest.raises(ParamError) as e:
        fn()
    return e.value


@pytest.mark.parametrize("field, kw, body, params, argv", BAD, ids=[b[0] for b in BAD])
def test_a_bad_field_is_refused_alike_at_every_door(field, kw, body, params, argv, home, cli):
    from imgsearch.ui.app import request_of

    api = _refusal(lambda: Library(home).search(**{"text": "x", **kw}))  # before the library is even opened
    assert api.param == field
    doors = [lambda: SearchRequest.from_json(body), lambda: SearchRequest.from_params(params)]
    if not any(isinstance(v, list) for v in params.values()):  # the page's URL holds one value per name
        doors.append(lambda: request_of(params))
    for door in doors:
        other = _refusal(door)
        assert (other.param, other.detail) == (api.param, api.detail)
    if argv is not None:
        r = cli("query", *argv, "--no-server")
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.strip().endswith(api.detail), r.stderr


def test_min_score_out_of_range_or_not_a_number_says_the_same_everywhere(home):
    want = "min_score: give a cosine score between -1 and 1, such as 0.25"
    for fn in (lambda: Library(home).search("x", min_score=math.inf), lambda: Library(home).search("x", min_score=2),
               lambda: SearchRequest.from_json({"texts": ["x"], "min_score": 2}),
               lambda: SearchRequest.from_json({"texts": ["x"], "min_score": "0.2"}),
               lambda: SearchRequest.from_params({"q": "x", "min_score": "nan"})):
        assert str(_refusal(fn)) == want


def test_json_the_server_cannot_use_is_named(home):
    assert _refusal(lambda: SearchRequest.from_json({"texts": ["x"], "bogus": 1})).param == "bogus"
    assert _refusal(lambda: SearchRequest.from_json({"texts": [{"text": "x", "weight": "2"}]})).param == "texts[0]"
    assert _refusal(lambda: SearchRequest.from_json({"texts": ["x"], "ids": ["1"]})).param == "ids"
    assert _refusal(lambda: SearchRequest.from_json({"texts": ["x"], "relevance": "yes"})).param == "relevance"
    assert _refusal(lambda: SearchRequest.from_json([1, 2])).param == "body"
    with pytest.raises(UsageError, match="nothing to search for"):
        SearchRequest.from_json({})


def test_a_request_round_trips_through_json(tmp_path):
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(img)
    r = SearchRequest.build(["2:red car", (0.5, "night")], image=[str(img)], not_text="people", ids=[3], k=7,
                            min_score=0.1, under=str(tmp_path), tag=["dog"], keyword="trip", blend=0.3,
                            after="2023", near=(48.85, 2.29, 5), relevance=True)
    back = SearchRequest.from_json(r.to_json())
    assert [(t.kind, t.weight) for t in back.positives] == [("text", 2.0), ("text", 0.5), ("image", 1.0), ("id", 1.0)]
    assert back.positives[2].value == img.read_bytes()  # the server gets the file's bytes, never the path
    assert (back.k, back.min_score, back.under, back.tags, back.keyword, back.blend, back.relevance) == (
        7, 0.1, str(tmp_path), ("dog",), "trip", 0.3, True)
    assert back.when == {"after": "2023", "near": [48.85, 2.29, 5]} and back.ids == (3,)


def test_a_number_too_big_for_a_float_is_refused_naming_its_field(home):
    """JSON numbers have any number of digits: 10**400 reached math.isfinite / float() and the server answered
    'internal error: OverflowError'."""
    huge = 10 ** 400
    for body, field in (({"texts": ["x"], "min_score": huge}, "min_score"),
                        ({"texts": ["x"], "keyword": "x", "blend": huge}, "blend"),
                        ({"texts": [{"text": "x", "weight": huge}]}, "texts[0]"),
                        ({"texts": ["x"], "near": [huge, 2]}, "near"),
                        ({"texts": ["x"], "near": [1, 2, huge]}, "near")):
        assert _refusal(lambda: SearchRequest.from_json(body)).param == field
    assert _refusal(lambda: Library(home).search("x", near=(1, huge))).param == "near"


def test_a_cli_refusal_stays_one_short_line_whatever_the_value(home, cli):
    """The flag's value was echoed as typed: a newline in it split the message into two lines, and a pasted
    page came back whole."""
    for argv in (["x", "--after", "2023\nfoo"], ["x", "--near", "48.85\n2.29"],
                 ["--keyword", "x" * 5000], ["x", "--near", "9" * 5000]):
        r = cli("query", *argv, "--no-server")
        assert r.exit_code == 2 and r.stderr.startswith("error: --"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and len(r.stderr) < 400, r.stderr[:400]


def test_a_device_is_not_read_to_be_sent_to_the_server():
    """A query image goes to a running server as its bytes: `query -i /dev/zero` (the server is used by default)
    read until memory ran out (and a FIFO waited forever), where --no-server refuses it at once. In a process
    capped at 512 MB, so that the old behaviour fails fast."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 29, 1 << 29)); "
            "from imgsearch.request import SearchRequest; SearchRequest.build(image='/dev/zero').to_json()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == (
        "imgsearch.errors.UsageError: cannot use query image /dev/zero: not a regular file"), r.stderr


def test_a_weight_is_read_alike_at_every_door_and_a_ratio_or_a_time_is_words():
    """'.5:red', '2.:red' and '1e2:red' were searched as those words, and '16:9 wallpaper' as weight 16 on
    '9 wallpaper'; each now reads the same as the CLI argument, a JSON text and a URL q."""
    from imgsearch.ui.app import request_of

    cases = {".5:red": (0.5, "red"), "2.:red": (2.0, "red"), "1e2:red": (100.0, "red"), "-0.5:red": (-0.5, "red"),
             "16:9 wallpaper": (1.0, "16:9 wallpaper"), "12:30": (1.0, "12:30"), "2: 3 dogs": (2.0, "3 dogs"),
             "note: red": (1.0, "note: red")}
    for raw, want in cases.items():
        for door in (lambda: SearchRequest.build(raw), lambda: SearchRequest.from_json({"texts": [raw]}),
                     lambda: SearchRequest.from_params({"q": [raw]}), lambda: request_of({"q": raw})):
            term = door().positives[0]
            assert (term.weight, term.value) == want, raw
    with pytest.raises(UsageError, match="weight 1e4 in '1e4:red' is out of range"):
        SearchRequest.build("1e4:red")
