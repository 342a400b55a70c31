"""Schema upgrades: a library made by an older imgsearch opens and keeps its data; a newer one is refused."""

from __future__ import annotations

import sqlite3

import pytest

from imgsearch.errors import LibraryError
from imgsearch.migrations import MIGRATIONS, SCHEMA_VERSION


def _old_library(db, upto: int) -> None:
    """A library.db as an imgsearch that knew only migrations 1..upto wrote it, holding some user data."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "applied_at REAL NOT NULL)")
    for version, name, statements in MIGRATIONS:
        if version > upto:
            break
        for stmt in statements:
            conn.execute(stmt)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, name))
    conn.execute("INSERT INTO models (name, pretrained, fingerprint, dim, version, created_at) "
                 "VALUES ('ViT-B-32', 'openai', 'fp', 2, 1, 0)")
    conn.execute("INSERT INTO images (path, folder, name, size, mtime_ns, hash, added_at, updated_at) "
                 "VALUES ('/photos/cat.jpg', '/photos', 'cat.jpg', 10, 1, 'abc', 0, 0)")
    conn.execute("INSERT INTO vectors (model_id, image_id, vector, seq) VALUES (1, 1, ?, 1)",
                 (b"\x00\x00\x80\x3f\x00\x00\x00\x00",))
    conn.execute("INSERT INTO captions (image_id, text, source, added_at) VALUES (1, 'my cat on the sofa', 'cli', 0)")
    conn.execute("INSERT INTO runs (model_id, roots, started_at, finished_at, new) VALUES (1, '/photos', 0, 1, 1)")
    conn.commit()
    conn.close()


def test_migrations_are_numbered_in_order_and_named():
    versions = [v for v, _, _ in MIGRATIONS]
    assert versions == list(range(1, len(MIGRATIONS) + 1)) and SCHEMA_VERSION == versions[-1]
    assert len({n for _, n, _ in MIGRATIONS}) == len(MIGRATIONS)


def test_library_from_an_older_schema_upgrades_and_keeps_its_data(tmp_path):
    from imgsearch.store import Store

    db = tmp_path / "library.db"
    _old_library(db, upto=3)
    store = Store(db)
    try:
        assert store.schema_version == SCHEMA_VERSION
        assert len(store.library_id) == 32  # the identity migration 4 creates
        assert store.captions_of(1) == ["my cat on the sofa"]
        assert store.images_at(["/photos/cat.jpg"])["/photos/cat.jpg"].hash == "abc"
        ids, vecs = store.load_vectors(1)
        assert ids.tolist() == [1] and vecs.tolist() == [[1.0, 0.0]]
        assert store.last_run()["new"] == 1 and store.last_run()["pid"] is None  # column added, old row kept
        assert store.keyword_matches("sofa") and store.keyword_matches("sofa")[0][0] == 1
    finally:
        store.close()
    # The upgrade is recorded: opening again applies nothing and keeps the same identity.
    again = Store(db)
    try:
        assert again.library_id == store.library_id
        assert again.rows("SELECT count(*) FROM schema_migrations")[0][0] == SCHEMA_VERSION
    finally:
        again.close()


def test_library_from_a_newer_schema_is_refused_and_left_untouched(tmp_path):
    from imgsearch.store import Store

    db = tmp_path / "library.db"
    _old_library(db, upto=SCHEMA_VERSION)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE future_things (x)")
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'from_the_future', 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(LibraryError) as e:
        Store(db)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"written by a newer imgsearch (schema {SCHEMA_VERSION + 1} > {SCHEMA_VERSION})" in msg
    assert "upgrade imgsearch" in msg
    assert db.read_bytes() == before
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")][-1] == \
        SCHEMA_VERSION + 1
    conn.close()


def test_newer_library_is_refused_through_the_cli_with_one_line(tmp_path, cli):
    home = cli.home
    home.mkdir(parents=True, exist_ok=True)
    db = home / "library.db"
    _old_library(db, upto=SCHEMA_VERSION)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'from_the_future', 0)", (SCHEMA_VERSION + 7,))
    conn.commit()
    conn.close()
    before = db.read_bytes()
    r = cli("status")
    assert r.exit_code == 1, r.output
    assert "newer imgsearch" in r.stderr and "Traceback" not in r.output
    assert db.read_bytes() == before
