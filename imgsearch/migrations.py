"""The library schema as numbered, named migrations (recorded in ``schema_migrations``), applied on open.

The missing ones are applied in order in one transaction, so a crash half-way leaves the old schema intact. A
library written by a newer imgsearch is refused untouched: an older program must not guess at unknown tables.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import LibraryError

# Each migration is (version, name, statements). Never edit a released one; append a new one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "initial", [
        """CREATE TABLE images (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL UNIQUE,
            folder TEXT NOT NULL,
            name TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            hash TEXT NOT NULL,
            width INTEGER,
            height INTEGER,
            taken_at TEXT,
            added_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX ix_images_hash ON images(hash)",
        "CREATE INDEX ix_images_folder ON images(folder)",
        """CREATE TABLE models (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            pretrained TEXT NOT NULL DEFAULT '',
            fingerprint TEXT NOT NULL,
            dim INTEGER NOT NULL,
            version INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            UNIQUE (name, pretrained, fingerprint)
        )""",
        """CREATE TABLE vectors (
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            vector BLOB NOT NULL,
            PRIMARY KEY (model_id, image_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX ix_vectors_image ON vectors(image_id)",
        """CREATE TABLE failures (
            path TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            size INTEGER,
            mtime_ns INTEGER,
            at REAL NOT NULL
        )""",
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            model_id INTEGER REFERENCES models(id) ON DELETE SET NULL,
            roots TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            new INTEGER DEFAULT 0, updated INTEGER DEFAULT 0, unchanged INTEGER DEFAULT 0,
            moved INTEGER DEFAULT 0, removed INTEGER DEFAULT 0, failed INTEGER DEFAULT 0,
            interrupted INTEGER DEFAULT 0
        )""",
    ]),
    # Zero-shot tags (with the model and label set that produced them), user captions, cached perceptual
    # fingerprints for `duplicates`, and an FTS5 index over names, folders, captions and tags that triggers
    # keep in sync. Deleting an image cascades to all of them.
    (2, "tags_captions_keywords", [
        """CREATE TABLE tag_sets (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            labels TEXT NOT NULL,
            templates TEXT NOT NULL,
            created_at REAL NOT NULL,
            UNIQUE (model_id, labels, templates)
        )""",
        """CREATE TABLE tags (
            set_id INTEGER NOT NULL REFERENCES tag_sets(id) ON DELETE CASCADE,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            label TEXT NOT NULL,
            prob REAL NOT NULL,
            PRIMARY KEY (set_id, image_id, label)
        ) WITHOUT ROWID""",
        "CREATE INDEX ix_tags_label ON tags(label COLLATE NOCASE, image_id)",
        "CREATE INDEX ix_tags_image ON tags(image_id)",
        """CREATE TABLE captions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            source TEXT,
            added_at REAL NOT NULL,
            UNIQUE (image_id, text)
        )""",
        """CREATE TABLE image_fingerprints (
            image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
            hash TEXT NOT NULL,
            data BLOB NOT NULL
        )""",
        "CREATE VIRTUAL TABLE image_text USING fts5(name, folder, captions, tags, "
        "tokenize = 'unicode61 remove_diacritics 2')",
        "INSERT INTO image_text (rowid, name, folder, captions, tags) SELECT id, name, folder, '', '' FROM images",
        """CREATE TRIGGER image_text_ai AFTER INSERT ON images BEGIN
            INSERT INTO image_text (rowid, name, folder, captions, tags) VALUES (new.id, new.name, new.folder, '', '');
        END""",
        """CREATE TRIGGER image_text_au AFTER UPDATE OF path, name, folder ON images BEGIN
            UPDATE image_text SET name = new.name, folder = new.folder WHERE rowid = new.id;
        END""",
        """CREATE TRIGGER image_text_ad AFTER DELETE ON images BEGIN
            DELETE FROM image_text WHERE rowid = old.id;
        END""",
        # Tags describe pixels: new content makes them wrong. Captions are the user's words and stay.
        """CREATE TRIGGER tags_stale AFTER UPDATE OF hash ON images WHEN old.hash != new.hash BEGIN
            DELETE FROM tags WHERE image_id = new.id;
        END""",
        """CREATE TRIGGER captions_ai AFTER INSERT ON captions BEGIN
            UPDATE image_text SET captions = coalesce((SELECT group_concat(text, ' | ') FROM captions
                WHERE image_id = new.image_id), '') WHERE rowid = new.image_id;
        END""",
        """CREATE TRIGGER captions_ad AFTER DELETE ON captions BEGIN
            UPDATE image_text SET captions = coalesce((SELECT group_concat(text, ' | ') FROM captions
                WHERE image_id = old.image_id), '') WHERE rowid = old.image_id;
        END""",
        """CREATE TRIGGER tags_ai AFTER INSERT ON tags BEGIN
            UPDATE image_text SET tags = coalesce((SELECT group_concat(DISTINCT label) FROM tags
                WHERE image_id = new.image_id), '') WHERE rowid = new.image_id;
        END""",
        """CREATE TRIGGER tags_ad AFTER DELETE ON tags BEGIN
            UPDATE image_text SET tags = coalesce((SELECT group_concat(DISTINCT label) FROM tags
                WHERE image_id = old.image_id), '') WHERE rowid = old.image_id;
        END""",
    ]),
    # Change tracking so FAISS caches can apply deltas instead of rebuilding: each vector row carries the
    # model version that wrote it, and deletions leave a tombstone with the version that removed them.
    (3, "vector_change_log", [
        "ALTER TABLE vectors ADD COLUMN seq INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX ix_vectors_seq ON vectors(model_id, seq)",
        """CREATE TABLE vector_deletions (
            model_id INTEGER NOT NULL,
            image_id INTEGER NOT NULL,
            seq INTEGER NOT NULL
        )""",
        "CREATE INDEX ix_vector_deletions ON vector_deletions(model_id, seq)",
        """CREATE TRIGGER vectors_ad AFTER DELETE ON vectors BEGIN
            INSERT INTO vector_deletions (model_id, image_id, seq)
            VALUES (old.model_id, old.image_id, (SELECT version FROM models WHERE id = old.model_id) + 1);
        END""",
    ]),
    # A random identity per database, so a FAISS cache built for another library.db (one moved aside and
    # recreated has the same model ids and versions) is never trusted; and the pid of each index run, so
    # `status` can tell a run that is still going from one whose process was killed.
    (4, "library_identity", [
        "CREATE TABLE library_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO library_meta (key, value) VALUES ('library_id', lower(hex(randomblob(16))))",
        "ALTER TABLE runs ADD COLUMN pid INTEGER",
    ]),
    # When and where: capture time as recorded (taken_at, local wall clock) plus its UTC instant and offset,
    # where the time came from ('exif', or 'file' for the file's mtime), GPS position and camera. Rows from
    # before stay NULL until the next `index` run fills them from the file headers (no re-encode).
    (5, "when_where", [
        "ALTER TABLE images ADD COLUMN taken_utc TEXT",
        "ALTER TABLE images ADD COLUMN taken_offset TEXT",
        "ALTER TABLE images ADD COLUMN taken_source TEXT",
        "ALTER TABLE images ADD COLUMN gps_lat REAL",
        "ALTER TABLE images ADD COLUMN gps_lon REAL",
        "ALTER TABLE images ADD COLUMN camera_make TEXT",
        "ALTER TABLE images ADD COLUMN camera_model TEXT",
        "CREATE INDEX ix_images_taken_at ON images(taken_at)",
        "CREATE INDEX ix_images_taken_utc ON images(taken_utc)",
        "CREATE INDEX ix_images_gps ON images(gps_lat, gps_lon)",
    ]),
    # Smart albums (albums.py): the saved search as JSON, not a list of photos; what its members were when
    # last evaluated (count, and a digest of their ids to tell when that changed); photos pinned in (keep 1)
    # or dropped (keep 0) by id, so pins follow moved files; and its query vector per model, so an album
    # of example images needs neither the image tower nor the example files again until the model changes.
    (6, "albums", [
        """CREATE TABLE albums (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE COLLATE NOCASE,
            request TEXT NOT NULL,
            created_at REAL NOT NULL,
            changed_at REAL NOT NULL,
            members INTEGER NOT NULL DEFAULT 0,
            digest TEXT NOT NULL DEFAULT ''
        )""",
        """CREATE TABLE album_pins (
            album_id INTEGER NOT NULL REFERENCES albums(id) ON DELETE CASCADE,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            keep INTEGER NOT NULL,
            PRIMARY KEY (album_id, image_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX ix_album_pins_image ON album_pins(image_id)",
        """CREATE TABLE album_vectors (
            album_id INTEGER NOT NULL REFERENCES albums(id) ON DELETE CASCADE,
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            vector BLOB NOT NULL,
            PRIMARY KEY (album_id, model_id)
        ) WITHOUT ROWID""",
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def applied(conn, path: Path) -> set[int]:
    """Versions recorded in a library (an SQLAlchemy connection; empty for a brand-new file), refusing one
    written by a newer imgsearch."""
    from sqlalchemy import text

    has = conn.execute(text("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'")).first()
    done = {r[0] for r in conn.execute(text("SELECT version FROM schema_migrations"))} if has else set()
    if done and max(done) > SCHEMA_VERSION:
        raise LibraryError(
            f"library {path} was written by a newer imgsearch (schema {max(done)} > "
            f"{SCHEMA_VERSION}); upgrade imgsearch to use it")
    return done


def migrate(engine, path: Path, *, read_only: bool) -> None:
    """Bring the library behind ``engine`` up to SCHEMA_VERSION, or explain why it cannot be. A read-only
    library is never written (an older one gets the advice to open it where it is writable)."""
    from sqlalchemy import text

    with engine.connect() as c:  # a read first: a newer library must not even get the bookkeeping table
        done = applied(c, path)
    if read_only:
        if max(done, default=0) < SCHEMA_VERSION:
            raise LibraryError(
                f"library {path.parent} is read-only and was written by an older imgsearch (schema "
                f"{max(done, default=0)} < {SCHEMA_VERSION}); open it once where it is writable to upgrade it")
        return
    with engine.begin() as c:
        # Python's sqlite3 opens a transaction only before INSERT/UPDATE/DELETE: without this BEGIN each
        # CREATE and ALTER committed on its own, and a run killed half-way left a library that no later open
        # could upgrade ("table images already exists"). IMMEDIATE: a second process waits, then finds it done.
        c.exec_driver_sql("BEGIN IMMEDIATE")
        c.execute(text("CREATE TABLE IF NOT EXISTS schema_migrations ("
                       "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"))
        done = applied(c, path)
        for version, name, statements in MIGRATIONS:
            if version not in done:
                for stmt in statements:
                    c.execute(text(stmt))
                c.execute(text("INSERT INTO schema_migrations VALUES (:v, :n, :t)"),
                          {"v": version, "n": name, "t": time.time()})
