"""Crash safety, model separation, and the FAISS cache as a rebuildable, never-trusted file."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from imgsearch import synthetic
from imgsearch.encoder import save_local_dir


def hits_of(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_interrupt_keeps_finished_batches_and_resumes(cli, photos, monkeypatch):
    from imgsearch.encoder import Encoder

    real = Encoder.encode_image_tensors
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Encoder, "encode_image_tensors", flaky)
    r = cli("--batch-size", "8", "index", photos)
    assert r.exit_code == 130 and "interrupted" in r.stderr
    st = json.loads(cli("status", "--json").stdout)
    assert st["images"] == 16 and st["models"][0]["vectors"] == 16  # two finished batches kept
    assert st["last_run"]["interrupted"] == 1
    monkeypatch.setattr(Encoder, "encode_image_tensors", real)
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert (rep["new"], rep["unchanged"], rep["encoded"]) == (38, 16, 38)


@pytest.mark.slow
def test_killed_process_leaves_a_readable_library(home, model_id, tmp_path):
    photos = tmp_path / "many"
    synthetic.generate(photos, per_class=10, size=64, captions_file=None)
    script = tmp_path / "slow_index.py"
    script.write_text(textwrap.dedent(f"""
        import time, sys
        from imgsearch.encoder import Encoder
        real = Encoder.encode_image_tensors
        def slow(self, batch):
            time.sleep(0.3)
            return real(self, batch)
        Encoder.encode_image_tensors = slow
        from imgsearch.cli import app
        sys.argv = ["imgsearch", "--home", {str(home)!r}, "--model", {model_id!r}, "--device", "cpu",
                    "--batch-size", "4", "index", {str(photos)!r}]
        app()
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = home / "library.db"
    deadline = time.time() + 120
    count = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as c:
                    count = c.execute("SELECT count(*) FROM vectors").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0
            if count >= 20:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "indexing finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        kept = c.execute("SELECT count(*) FROM vectors").fetchone()[0]
        assert kept >= 20 and kept % 4 == 0  # whole batches only
    from imgsearch.cli import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["--home", str(home), "--model", model_id, "--device", "cpu", "index", str(photos),
                                 "--json"])
    rep = json.loads(r.stdout)
    assert rep["new"] == 180 - kept and rep["unchanged"] == kept


def other_model(tmp_path: Path) -> str:
    model, cfg = synthetic.build_tiny_clip(seed=123)
    out = save_local_dir(model, cfg, tmp_path / "other-model", {"size": 32})
    return f"local-dir:{out}"


def test_second_model_gets_its_own_vectors(cli, photos, tmp_path):
    other = other_model(tmp_path)
    cli("index", photos)
    r = cli("query", "a red circle", model=other)
    assert r.exit_code == 1
    assert "no vectors for" in r.stderr and "index" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    rep = json.loads(cli("index", photos, "--json", model=other).stdout)
    assert (rep["new"], rep["unchanged"], rep["encoded"]) == (0, 54, 54)
    st = json.loads(cli("status", "--json").stdout)
    assert [m["vectors"] for m in st["models"]] == [54, 54]
    assert len(hits_of(cli("query", "a red circle", "--json", model=other))) == 10
    # The trained model's answers are unaffected by the second set.
    hits = hits_of(cli("query", "a red circle", "-k", "1", "--json"))
    assert Path(hits[0]["path"]).name.startswith("red_circle")


def test_rewritten_model_weights_are_a_different_model(cli, photos, tmp_path):
    path = tmp_path / "m"
    model, cfg = synthetic.build_tiny_clip(seed=1)
    save_local_dir(model, cfg, path, {"size": 32})
    cli("index", photos, model=f"local-dir:{path}")
    model, cfg = synthetic.build_tiny_clip(seed=2)
    save_local_dir(model, cfg, path, {"size": 32})
    r = cli("query", "a red circle", model=f"local-dir:{path}")
    assert r.exit_code == 1 and "different weights" in r.stderr


def test_faiss_cache_missing_damaged_or_stale_is_rebuilt(cli, photos, home):
    cli("index", photos)
    expected = hits_of(cli("query", "a purple square", "--json"))
    (cache,) = list((home / "index").glob("model-*.faiss"))
    cache.unlink()
    assert hits_of(cli("query", "a purple square", "--json")) == expected
    assert cache.exists()
    data = bytearray(cache.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte in the middle
    cache.write_bytes(bytes(data))
    # The checksum is verified: a damaged middle is reported, not only a damaged header (issue 12).
    assert json.loads(cli("status", "--json").stdout)["models"][0]["index_state"] == "damaged"
    assert hits_of(cli("query", "a purple square", "--json")) == expected
    cache.write_bytes(b"garbage")
    assert json.loads(cli("status", "--json").stdout)["models"][0]["index_state"] == "damaged"
    assert hits_of(cli("query", "a purple square", "--json")) == expected
    # Stale: an old cache file put back after the library changed must not hide new images.
    old = cache.read_bytes()
    import random

    synthetic.draw_shape("purple", "square", 96, random.Random(77)).save(photos / "new_purple.jpg")
    cli("index", photos)
    cache.write_bytes(old)
    assert "stale" in json.loads(cli("status", "--json").stdout)["models"][0]["index_state"]
    paths = [h["path"] for h in hits_of(cli("query", "a purple square", "-k", "55", "--json"))]
    assert str(photos / "new_purple.jpg") in paths and len(paths) == 55


@pytest.mark.slow
def test_a_cache_written_by_an_older_imgsearch_is_stale_not_damaged_and_is_rebuilt(cli, photos, home):
    import struct

    from imgsearch.vectors import FORMAT

    cli("index", photos)
    expected = hits_of(cli("query", "a purple square", "--json"))
    (cache,) = list((home / "index").glob("model-*.faiss"))
    data = bytearray(cache.read_bytes())
    data[8:12] = struct.pack("<I", FORMAT - 1)  # what an older release wrote: sound, in its own format
    cache.write_bytes(bytes(data))
    (line,) = [line for line in cli("status").stdout.splitlines() if " vectors, dim " in line]
    # Said as a stale cache is, and no "None" for the index type the file's own header no longer gives.
    assert re.search(r"index stale: written by another version of imgsearch \(rebuilt on next query\) "
                     r"\([0-9.]+ [KM]?B\)$", line), line
    assert hits_of(cli("query", "a purple square", "--json")) == expected
    assert json.loads(cli("status", "--json").stdout)["models"][0]["index_state"] == "ok"


def test_unreadable_library_database_is_a_clear_error(cli, home, photos):
    home.mkdir(parents=True)
    (home / "library.db").write_bytes(b"this is not sqlite" * 100)
    r = cli("index", photos)
    assert r.exit_code == 1 and "unreadable" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_query_without_library(cli):
    r = cli("query", "a red circle")
    assert r.exit_code == 1 and "no library" in r.stderr
    r = cli("status")
    assert r.exit_code == 1 and "no library" in r.stderr


def test_change_log_is_applied_then_pruned(cli, photos, settings):
    """Index runs update the FAISS cache from SQLite's change log, and spent tombstones are dropped."""
    from imgsearch.store import Store

    cli("index", photos)
    (photos / "red_circle_000.jpg").unlink()
    (photos / "blue_square_001.jpg").unlink()
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert rep["removed"] == 2
    store = Store(settings.db_path)
    try:
        assert store.scalar("SELECT count(*) FROM vector_deletions") == 0  # cache caught up, log pruned
    finally:
        store.close()
    hits = hits_of(cli("query", "a red circle", "-k", "60", "--json"))
    assert len(hits) == 52 and not any(h["path"].endswith(("red_circle_000.jpg", "blue_square_001.jpg"))
                                       for h in hits)
