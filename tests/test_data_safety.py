"""A hostile pass on the user's files and library: nothing of the user's is lost, nothing that is not
imgsearch's is touched, a killed run leaves a library that opens and a rerun that completes.

Kill points are found deterministically: a child process patches one function to SIGKILL itself on its Nth
call (``killed_at``), never by sleeping."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imgsearch import synthetic


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0] and "Traceback" not in result.output, result.output
    return lines[0]


def killed_at(target: str, n: int, *argv) -> subprocess.CompletedProcess:
    """Run ``imgsearch ARGV`` in a child that SIGKILLs itself on the ``n``th call of ``target``
    ("module:attr.attr"), before that call does anything; asserts that it was killed there."""
    code = textwrap.dedent(f"""
        import importlib, os, signal, sys
        module, attr = {target!r}.split(":")
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        real, calls = getattr(owner, name), [0]
        def hooked(*args, **kwargs):
            calls[0] += 1
            if calls[0] == {n}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        setattr(owner, name, hooked)
        from imgsearch.cli import app
        sys.argv = ["imgsearch", *sys.argv[1:]]
        app()
    """)
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    return proc


# --- forget and index take exactly the folder named -----------------------------------------------------
def test_a_folder_differing_only_in_case_or_by_a_wildcard_is_never_taken_along(cli, tmp_path):
    """SQLite's LIKE ignores ASCII case: `index p/Trip` removed the rows of p/trip, `forget p/TRIP` (no such
    folder) forgot p/Trip."""
    root = tmp_path / "p"
    names = ("trip", "Trip", "tr_p", "trip2", "t%p")
    for seed, name in enumerate(names):
        synthetic.generate(root / name, per_class=1, colors=["red"], shapes=("circle",), size=48, seed=seed,
                           captions_file=None)
    assert ok_json(cli("index", root, "--json"))["new"] == 5
    assert cli("caption", root / "trip" / "red_circle_000.png", "grandma's zeppelin").exit_code == 0
    rep = ok_json(cli("index", root / "Trip", "--json"))
    assert (rep["unchanged"], rep["removed"]) == (1, 0)
    assert ok_json(cli("status", "--json"))["images"] == 5
    under = ok_json(cli("query", "a red circle", "--under", root / "Trip", "-k", "10", "--json"))
    assert [Path(h["path"]).parent.name for h in under] == ["Trip"]
    assert "nothing in the library" in one_line(cli("forget", root / "TRIP"))
    for name in ("tr_p", "trip", "t%p"):
        assert cli("forget", root / name).stdout.strip() == "removed 1 image from the library"
    left = ok_json(cli("query", "a red circle", "-k", "10", "--json"))
    assert sorted(Path(h["path"]).parent.name for h in left) == ["Trip", "trip2"]


# --- a migration killed half-way ------------------------------------------------------------------------
def back_to_schema_4(db: Path) -> None:
    """Undo migrations 5 and 6, as a library written by imgsearch of schema 4 is."""
    with sqlite3.connect(db) as c:
        for table in ("album_vectors", "album_pins", "albums"):
            c.execute(f"DROP TABLE {table}")
        for index in ("ix_images_taken_at", "ix_images_taken_utc", "ix_images_gps"):
            c.execute(f"DROP INDEX {index}")
        for column in ("taken_utc", "taken_offset", "taken_source", "gps_lat", "gps_lon", "camera_make",
                       "camera_model"):
            c.execute(f"ALTER TABLE images DROP COLUMN {column}")
        c.execute("DELETE FROM schema_migrations WHERE version >= 5")


@pytest.mark.parametrize("version, statements_done", [(5, 3), (5, 9), (6, 1)])
def test_a_migration_killed_half_way_is_redone_whole_on_the_next_open(cli, home, model_id, tmp_path, version,
                                                                      statements_done):
    """Each CREATE and ALTER committed on its own: a kill after some of them left a library no later run could
    open ("duplicate column name: taken_utc")."""
    folder = tmp_path / "pics"
    synthetic.generate(folder, per_class=1, colors=["red", "blue"], size=48, captions_file=None)
    assert ok_json(cli("index", folder, "--json"))["new"] == 6
    target = folder / "red_circle_000.png"
    assert cli("caption", target, "grandma's zeppelin").exit_code == 0
    back_to_schema_4(home / "library.db")
    code = textwrap.dedent(f"""
        import os, signal, sys
        from imgsearch import migrations

        class KilledAfter(list):
            def __iter__(self):
                for i, statement in enumerate(list.__iter__(self)):
                    if i == {statements_done}:
                        os.kill(os.getpid(), signal.SIGKILL)
                    yield statement

        migrations.MIGRATIONS[:] = [(v, name, KilledAfter(s) if v == {version} else s)
                                    for v, name, s in migrations.MIGRATIONS]
        from imgsearch.cli import app
        sys.argv = ["imgsearch", "--home", sys.argv[1], "status"]
        app()
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(home)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    st = ok_json(cli("status", "--json"))
    assert (st["schema_version"], st["images"], st["models"][0]["vectors"]) == (6, 6, 6)
    assert [Path(h["path"]).name for h in ok_json(cli("query", "--keyword", "zeppelin", "--json"))] == [target.name]
    assert cli("album", "save", "reds", "a red circle").exit_code == 0  # migration 6's tables are there
    assert ok_json(cli("index", folder, "--json"))["unchanged"] == 6


# --- a damaged library ----------------------------------------------------------------------------------
@pytest.mark.parametrize("table", ["images", "models"])
def test_a_damaged_page_inside_the_database_is_one_line_and_the_file_is_kept(cli, home, tmp_path, table):
    """A database whose header is fine but one of whose pages is garbage: every command said 'internal error:
    DatabaseError: database disk image is malformed ... please report it'."""
    folder = tmp_path / "pics"
    synthetic.generate(folder, per_class=1, colors=["red", "blue"], size=48, captions_file=None)
    assert cli("index", folder).exit_code == 0
    db = home / "library.db"
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = c.execute("PRAGMA page_size").fetchone()[0]
        pages = [r[0] for r in c.execute("SELECT pageno FROM dbstat WHERE name = ?", (table,))]
    with open(db, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * page_size)
            f.write(bytes(range(256)) * (page_size // 256))
    damaged = db.read_bytes()
    for args in (("status",), ("query", "a red circle"), ("index", folder), ("forget", folder),
                 ("export", tmp_path / "out", "-q"), ("album", "save", "reds", "a red circle")):
        line = one_line(cli(*args))
        assert "is damaged. Copy it somewhere safe first" in line and str(db) in line, (args, line)
    assert db.read_bytes() == damaged and not (tmp_path / "out").exists()


# --- index removes a row only when its file is gone ------------------------------------------------------
def small_folder(folder: Path, seed: int = 0) -> Path:
    synthetic.generate(folder, per_class=1, colors=["red", "blue"], size=48, captions_file=None, seed=seed)
    return folder


def test_indexing_a_home_that_holds_photos_keeps_their_rows(model_id, tmp_path):
    """IMGSEARCH_HOME=~/Pictures: `index ~/Pictures/trip` added the trip, then `index ~/Pictures` skipped the
    whole folder as a library home and removed every row under it, captions with them."""
    from conftest import Cli

    pictures = tmp_path / "Pictures"
    trip = small_folder(pictures / "trip")
    cli = Cli(pictures, model_id)
    assert ok_json(cli("index", trip, "--json"))["new"] == 6
    assert cli("caption", trip / "red_circle_000.png", "grandma's zeppelin").exit_code == 0
    rep = ok_json(cli("index", pictures, "--json"))
    assert (rep["new"], rep["removed"]) == (0, 0)
    assert ok_json(cli("status", "--json"))["images"] == 6
    assert len(ok_json(cli("query", "--keyword", "zeppelin", "--json"))) == 1
    (trip / "blue_circle_000.png").unlink()  # a file that is really gone still goes
    assert ok_json(cli("index", trip, "--json"))["removed"] == 1


def test_a_hidden_folder_indexed_by_name_survives_an_index_of_its_parent(cli, tmp_path):
    root = small_folder(tmp_path / "photos")
    private = small_folder(root / ".private", seed=1)
    assert ok_json(cli("index", private, "--json"))["new"] == 6
    rep = ok_json(cli("index", root, "--json"))
    assert (rep["new"], rep["removed"]) == (6, 0)
    assert ok_json(cli("status", "--json"))["images"] == 12


def test_a_folder_that_cannot_be_listed_keeps_its_rows(cli, tmp_path, monkeypatch):
    """A permission or I/O error on one subfolder made every image in it look deleted."""
    root = tmp_path / "photos"
    small_folder(root / "a")
    locked = small_folder(root / "b", seed=1)
    assert ok_json(cli("index", root, "--json"))["new"] == 12
    real = os.scandir

    def unlistable(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", unlistable)
    rep = ok_json(cli("index", root, "--json"))
    assert (rep["removed"], rep["unchanged"]) == (0, 6)
    assert [f["path"] for f in rep["failures"]] == [str(locked)]
    assert ok_json(cli("status", "--json"))["images"] == 12
    monkeypatch.setattr(os, "scandir", real)
    rep = ok_json(cli("index", root, "--json"))
    assert (rep["removed"], rep["unchanged"], rep["failed"]) == (0, 12, 0)


def test_a_drive_that_is_not_mounted_keeps_its_images_and_says_how_to_drop_them(cli, home, tmp_path):
    """`index /mnt/photos` (or `index /mnt`, or a watcher's catch-up) while the drive was not mounted: the empty
    mount point read as every photo deleted, and every row under it went, captions and album pins with them."""
    mnt = tmp_path / "mnt"
    drive, other = small_folder(mnt / "photos"), small_folder(mnt / "other", seed=1)
    small_folder(drive / "trip", seed=2)
    assert ok_json(cli("index", mnt, "--json"))["new"] == 18
    assert cli("caption", drive / "trip" / "red_circle_000.png", "grandma's zeppelin").exit_code == 0
    assert cli("album", "save", "trip", "a red circle").exit_code == 0
    assert cli("album", "pin", "trip", drive / "trip" / "blue_circle_000.png").exit_code == 0
    drive.rename(tmp_path / "unplugged")
    drive.mkdir()  # the mount point stays, empty
    r = cli("index", drive)
    assert r.exit_code == 0, r.output
    assert "removed 0," in r.stdout and (
        f"  kept 12 images under {drive}, which holds no images now (a drive not mounted?); "
        f"`imgsearch forget {drive}` drops them\n") in r.stdout
    rep = ok_json(cli("index", mnt, "--json"))  # the drive as one folder of a root that yields others
    assert (rep["removed"], rep["unchanged"], rep["kept"]) == (0, 6, {str(drive): 12})
    drive.rmdir()
    assert "no such file or folder" in one_line(cli("index", drive), code=2)
    drive.mkdir()
    with sqlite3.connect(home / "library.db") as c:
        assert c.execute("SELECT count(*) FROM images").fetchone()[0] == 18
        assert c.execute("SELECT count(*) FROM album_pins").fetchone()[0] == 1
    assert len(ok_json(cli("query", "--keyword", "zeppelin", "--json"))) == 0  # hits skip files not there
    drive.rmdir()
    (tmp_path / "unplugged").rename(drive)  # mounted again: nothing to redo, captions there
    rep = ok_json(cli("index", mnt, "--json"))
    assert (rep["new"], rep["removed"], rep["unchanged"], rep["kept"]) == (0, 0, 18, {})
    assert len(ok_json(cli("query", "--keyword", "zeppelin", "--json"))) == 1
    for name in os.listdir(drive / "trip"):  # files deleted in a folder that still yields files go
        (drive / "trip" / name).unlink()
    (drive / "trip").rmdir()
    (other / "red_circle_000.png").unlink()
    rep = ok_json(cli("index", mnt, "--json"))
    assert (rep["removed"], rep["kept"]) == (7, {})


# --- watch ----------------------------------------------------------------------------------------------
def test_a_watched_folder_replaced_by_an_empty_one_keeps_its_images(settings, tmp_path):
    """An unmounted drive leaves its empty mount point: the poller saw every photo deleted and forgot them all
    (inotify went on watching the vanished folder, silently)."""
    from test_watch import Running, draw, shapes, wait_for

    from imgsearch import Library

    drive, other = shapes(tmp_path / "drive"), tmp_path / "other"
    other.mkdir()
    with Library(settings=settings) as lib:
        run = Running(lib, [drive, other])
        try:
            images = lib.status().images
            assert images == 12
            drive.rename(tmp_path / "unmounted")
            drive.mkdir()  # the mount point, now empty
            wait_for(lambda: any("is gone" in s for s in run.said), what="the message about the unmounted drive")
            assert [s for s in run.said if "is gone" in s][0].startswith(f"watched folder {drive} is gone")
            new = draw(other / "red.jpg", "red", "circle")
            wait_for(lambda: [h.path for h in lib.search("a red circle", k=1)] == [str(new)],
                     what="the other folder still watched")
            assert lib.status().images == images + 1 and run.error is None
        finally:
            run.close()


# --- export killed while moving its files into place --------------------------------------------------
def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("fmt, moves_done", [("parquet", 1), ("clip-retrieval", 1), ("clip-retrieval", 2)])
def test_an_export_killed_while_publishing_is_cleared_by_the_next_one(cli, home, model_id, tmp_path, fmt,
                                                                      moves_done):
    """Killed after some of its files were moved into the folder: every later export refused the folder ('not
    empty: it holds files (.imgsearch-owned.json, img_emb)'), files imgsearch itself had written."""
    small_folder(tmp_path / "pics")
    assert cli("index", tmp_path / "pics").exit_code == 0
    clean = tmp_path / "clean"
    assert cli("export", clean, "--format", fmt, "-q").exit_code == 0
    out = tmp_path / "out"
    killed_at("imgsearch.exchange:_move_new", moves_done + 1, "--home", home, "--model", model_id, "export", out,
              "--format", fmt, "-q")
    assert any(not n.startswith(".imgsearch-export-") for n in os.listdir(out))  # killed half-published
    r = cli("export", out, "--format", fmt, "-q")
    assert r.exit_code == 0, r.output
    assert listing(out) == listing(clean)
    with sqlite3.connect(home / "library.db") as c:
        assert c.execute("SELECT count(*) FROM images").fetchone()[0] == 6


def test_a_half_published_export_holding_a_user_file_is_left_as_it_is(cli, home, model_id, tmp_path):
    small_folder(tmp_path / "pics")
    assert cli("index", tmp_path / "pics").exit_code == 0
    out = tmp_path / "out"
    killed_at("imgsearch.exchange:_move_new", 3, "--home", home, "--model", model_id, "export", out, "--format",
              "clip-retrieval", "-q")
    (out / "img_emb" / "notes.txt").write_text("mine")
    before = listing(out)
    line = one_line(cli("export", out, "--format", "clip-retrieval", "-q"), code=2)
    assert "unfinished export that imgsearch cannot prove it wrote" in line and "notes.txt" in line
    # Only the temporary folder, provably imgsearch's, went; what was moved in stays with the user's file.
    assert listing(out) == [p for p in before if not p.startswith(".imgsearch-export-")]
    assert (out / "img_emb" / "notes.txt").read_text() == "mine" and (out / "metadata").is_dir()


def test_a_planted_marker_never_names_a_file_outside_its_folder(cli, tmp_path):
    """A folder anyone can write to (/tmp/out) holding a fake leftover export whose marker lists
    '../../thesis.pdf' with that file's size and mtime: the next export into it deleted the thesis."""
    small_folder(tmp_path / "pics")
    assert cli("index", tmp_path / "pics").exit_code == 0
    thesis = tmp_path / "Documents" / "thesis.pdf"
    thesis.parent.mkdir()
    thesis.write_bytes(b"%PDF years of work")
    out = tmp_path / "shared" / "out"
    planted = out / ".imgsearch-export-000000000000.tmp"
    planted.mkdir(parents=True)
    st = thesis.stat()
    relative = os.path.relpath(thesis, planted)
    for files in ({relative: [st.st_size, st.st_mtime_ns]}, {"x": "not a size"}):
        (planted / ".imgsearch-owned.json").write_text(json.dumps(
            {"kind": "export-temp", "token": "0" * 32, "path": os.path.realpath(planted), "files": files}))
        line = one_line(cli("export", out, "-q"), code=2)
        assert "cannot prove it wrote" in line
        assert thesis.read_bytes() == b"%PDF years of work" and planted.is_dir()


def test_a_link_planted_in_the_export_folder_after_the_check_is_never_written_through(cli, tmp_path, monkeypatch):
    """An export folder others can write to: between the check that it is empty and the export's first write,
    someone links the name of the ownership marker's temporary file to a file of the user's, which the export
    then overwrote with its marker."""
    from imgsearch import exchange

    small_folder(tmp_path / "pics")
    assert cli("index", tmp_path / "pics").exit_code == 0
    victim = tmp_path / ".bashrc"
    victim.write_text("my shell settings")
    out = tmp_path / "shared" / "out"
    real = exchange.prepare_target

    def then_planted(target):
        made = real(target)
        os.symlink(victim, target / ".imgsearch-owned.json.tmp")
        return made

    monkeypatch.setattr(exchange, "prepare_target", then_planted)
    line = one_line(cli("export", out, "-q"), code=2)
    assert line.endswith("appeared while the export was being written; export into another folder")
    assert victim.read_text() == "my shell settings"
    assert os.listdir(out) == [".imgsearch-owned.json.tmp"]  # the planted link, nothing of the export's


@pytest.mark.parametrize("at, calls, how", [("shutil:copyfileobj", 3, "--copy"),
                                           ("imgsearch.exchange:_move_new", 3, "--copy"),
                                           ("imgsearch.exchange:_move_new", 3, "--link")])
def test_an_album_export_killed_half_way_is_taken_back_by_the_next_one(cli, home, model_id, tmp_path, at, calls,
                                                                       how):
    """`album export` killed while copying: the copies stayed, and every later export refused the folder as not
    empty, copies imgsearch itself had made, until the user deleted them by hand."""
    small_folder(tmp_path / "pics")
    assert cli("index", tmp_path / "pics").exit_code == 0
    assert cli("album", "save", "all", "a shape", "-k", "6").exit_code == 0
    clean = tmp_path / "clean"
    assert cli("album", "export", "all", clean, how).exit_code == 0
    out = tmp_path / "out"
    killed_at(at, calls, "--home", home, "--model", model_id, "album", "export", "all", out, how)
    assert os.listdir(out)  # killed half-way
    r = cli("album", "export", "all", out, how)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"{'linked' if how == '--link' else 'copied'} 6 photos of album all into {out}"
    assert listing(out) == listing(clean) and len(listing(out)) == 6
    for name in os.listdir(out):
        assert (out / name).is_symlink() == (how == "--link") and (out / name).read_bytes() == \
            (tmp_path / "pics" / name).read_bytes()


# --- the thumbnail cache --------------------------------------------------------------------------------
def test_a_thumbnail_that_is_a_link_is_neither_served_nor_replaced_and_a_damaged_one_is_made_again(
        settings, tmp_path):
    """A link at a thumbnail's name was served as the thumbnail (a user's file, read through the UI), and an
    empty thumbnail (a power cut before it reached the disk) was served for ever."""
    from imgsearch import Library
    from imgsearch.errors import DataError

    small_folder(tmp_path / "pics")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web page")
    with Library(settings=settings) as lib:
        lib.index(tmp_path / "pics")
        first, second = (h.id for h in lib.search("a red circle", k=2))
        made = lib.thumbnail(first)
        made.unlink()
        made.symlink_to(secret)
        with pytest.raises(DataError, match="is not a thumbnail imgsearch wrote"):
            lib.thumbnail(first)
        assert made.is_symlink() and secret.read_text() == "not for the web page"
        assert isinstance(lib.thumbnails([first, second])[first], DataError)
        damaged = lib.thumbnail(second)
        damaged.write_bytes(b"")
        assert lib.thumbnail(second).read_bytes()[:3] == b"\xff\xd8\xff"


# --- finetune --out -------------------------------------------------------------------------------------
def test_an_interrupt_between_the_two_renames_puts_the_previous_model_back(tmp_path, monkeypatch):
    """Ctrl-C after the previous model was renamed aside and before the new one took its place: the new one was
    deleted and the previous one stayed hidden in '.model.old-XXXX', so --out named nothing."""
    from imgsearch.encoder import WEIGHTS_FILE, save_local_dir

    out = tmp_path / "model"
    save_local_dir(*synthetic.build_tiny_clip(seed=1), out)
    weights = (out / WEIGHTS_FILE).read_bytes()
    real = Path.rename

    def interrupted(self, target):
        if Path(target) == out:
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_local_dir(*synthetic.build_tiny_clip(seed=2), out)
    assert (out / WEIGHTS_FILE).read_bytes() == weights
    assert os.listdir(tmp_path) == ["model"]


@pytest.mark.slow
def test_a_finetune_killed_during_its_final_save_leaves_nothing_the_next_save_keeps(tmp_path, captioned,
                                                                                    random_tiny_model):
    """kill -9 while `finetune` wrote its model: a hidden '.model.XXXXXXXX' folder with a partial model stayed
    beside --out for ever, one more per kill. One that a save still writes, or that is not imgsearch's, stays."""
    import fcntl
    import shutil

    from imgsearch.encoder import save_local_dir

    out = tmp_path / "model"
    killed_at("safetensors.torch:save_file", 1, "--model", f"local-dir:{random_tiny_model}", "--device", "cpu",
              "--precision", "fp32", "finetune", captioned, "--out", out, "--max-steps", "1")
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]
    assert not out.exists() and (left / "open_clip_config.json").exists()
    busy = shutil.copytree(left, tmp_path / ".model.busy0000")  # another save of --out, still writing
    mine = tmp_path / ".model.user0000"  # a user's folder that only looks like one
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        save_local_dir(*synthetic.build_tiny_clip(seed=1), out)
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model")) == [busy.name, mine.name]
    assert (mine / "notes.txt").read_text() == "mine" and (out / "open_clip_config.json").exists()


# --- what a killed run leaves in the home ---------------------------------------------------------------
def test_a_vector_cache_write_killed_half_way_leaves_nothing_the_next_run_keeps(cli, home, model_id, tmp_path):
    """Killed while writing the vector cache (as large as the vectors): its temporary file stayed in
    <home>/index for ever, one more per kill. One that another process is still writing is never touched."""
    import fcntl

    folder = small_folder(tmp_path / "pics")
    assert cli("index", folder).exit_code == 0
    (home / "index" / "model-1.faiss").unlink()  # the next query writes it again
    killed_at("os:fsync", 1, "--home", home, "--model", model_id, "query", "a red circle")
    (left,) = [p for p in (home / "index").iterdir() if p.name.endswith(".tmp")]
    assert left.name.startswith(".model-1.faiss.")
    busy = home / "index" / ".model-1.faiss.busy0000.tmp"  # another process's write in progress
    starting = home / "index" / ".model-1.faiss.new00000.tmp"  # one made this instant, not yet locked
    starting.touch()
    with open(busy, "wb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.write(b"half a cache")
        f.flush()
        assert ok_json(cli("index", folder, "--json"))["unchanged"] == 6
        assert sorted(os.listdir(home / "index")) == [busy.name, starting.name, "model-1.faiss"]
    assert ok_json(cli("status", "--json"))["models"][0]["index_state"] == "ok"


@pytest.mark.slow
@pytest.mark.real_export
def test_a_text_export_killed_half_way_is_cleared_by_the_next_build(cli, home, model_id, tmp_path):
    """Killed while writing the text tower's export (a quarter of a GB for ViT-B-32): its temporary folder stayed
    in <home>/exports for ever; the next run built another beside it."""
    folder = small_folder(tmp_path / "pics")
    killed_at("imgsearch.bpe:write_tables", 1, "--home", home, "--model", model_id, "--device", "cpu", "index",
              folder, "-q")
    (exports,) = (home / "exports").iterdir()
    assert [p.name for p in exports.iterdir() if p.name.startswith(".text.")]
    assert ok_json(cli("index", folder, "--json"))["unchanged"] == 6  # the export is built in this run
    assert sorted(os.listdir(exports)) == ["text"]


# --- a garbled export -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["x", {"dim": "abc", "fingerprint": "f"}, {"dim": True, "fingerprint": "f"}])
def test_a_garbled_model_record_in_an_export_is_one_line_and_imports_nothing(cli, tmp_path, model):
    """The model record of an export's manifest or of a parquet file's metadata, garbled: 'internal error:
    AttributeError: 'str' object has no attribute 'get''."""
    import pyarrow.parquet as pq

    small_folder(tmp_path / "pics")
    assert cli("index", tmp_path / "pics").exit_code == 0
    for where in ("manifest", "parquet"):
        out = tmp_path / f"out-{where}"
        assert cli("export", out, "-q").exit_code == 0
        if where == "manifest":
            manifest = json.loads((out / "_imgsearch_export.json").read_text())
            (out / "_imgsearch_export.json").write_text(json.dumps({**manifest, "model": model}))
        else:
            (out / "_imgsearch_export.json").unlink()
            part = out / "part-00000.parquet"
            table = pq.read_table(part)
            meta = {b"imgsearch": json.dumps({"format_version": 1, "model": model}).encode()}
            pq.write_table(table.replace_schema_metadata(meta), part)
        home2 = tmp_path / f"home-{where}"
        line = one_line(cli("--home", home2, "import", out, "-q"))
        assert "its record of the model that made the vectors is damaged" in line
        assert not (home2 / "library.db").exists()


def test_a_damaged_vector_is_one_line_never_misread_and_the_next_index_makes_it_again(cli, home, tmp_path):
    """A vector blob of the wrong length: every command failed with 'internal error: ValueError: buffer size
    must be a multiple of element size', and one short blob beside one as much too long was read as two
    vectors, each shifted."""
    folder = small_folder(tmp_path / "pics")
    assert cli("index", folder).exit_code == 0
    truth = [h["path"] for h in ok_json(cli("query", "a red circle", "-k", "6", "--json"))]
    with sqlite3.connect(home / "library.db") as c:
        (a, va), (b, vb) = c.execute("SELECT image_id, vector FROM vectors ORDER BY image_id LIMIT 2").fetchall()
        c.execute("UPDATE vectors SET vector = ? WHERE image_id = ?", (va[:-4], a))
        c.execute("UPDATE vectors SET vector = ? WHERE image_id = ?", (vb + b"\0" * 4, b))
    (home / "index" / "model-1.faiss").unlink()
    for args in (("query", "a red circle"), ("export", tmp_path / "out", "-q"), ("duplicates",)):
        line = one_line(cli(*args))
        assert f"the stored vector of image {a} is damaged" in line and "imgsearch index" in line, line
    assert ok_json(cli("index", folder, "--json"))["encoded"] == 2
    assert [h["path"] for h in ok_json(cli("query", "a red circle", "-k", "6", "--json"))] == truth


def test_a_write_lock_that_is_a_link_is_never_written_through(cli, home, tmp_path):
    folder = small_folder(tmp_path / "pics")
    assert cli("index", folder).exit_code == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (home / "write.lock").unlink()
    (home / "write.lock").symlink_to(notes)
    line = one_line(cli("forget", folder))
    assert "write.lock is a symbolic link; remove it" in line
    assert notes.read_text() == "my notes" and ok_json(cli("status", "--json"))["images"] == 6


# --- kill -9 at points of each writing command ------------------------------------------------------------
def tree_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def strays(home: Path) -> list[str]:
    """Files in the home that are none of a library's own (temporary files a killed run left)."""
    own = ("library.db", "library.db-wal", "library.db-shm", "write.lock", ".imgsearch-home")
    return [str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and p.name not in own
            and not p.match("index/model-*.faiss") and "exports" not in p.relative_to(home).parts[:1]]


@pytest.mark.parametrize("args, target, n", [
    pytest.param(("--batch-size", "2", "index", "{pics}"), "imgsearch.store:Store.write_batch", 2,
                 marks=pytest.mark.slow),  # the child loads the model
    (("import", "{export}"), "imgsearch.store:Store.write_batch", 1),
    (("album", "save", "reds", "a red circle"), "imgsearch.store:Store.add_album", 1),
    (("album", "pin", "blues", "{pics}/blue_circle_000.png"), "imgsearch.store:Store.set_album_pins", 1),
    (("forget", "{pics}/red_circle_000.png"), "imgsearch.store:Store.delete_images", 1),
])
def test_a_command_killed_at_its_write_leaves_a_library_that_opens_tells_the_truth_and_completes_a_rerun(
        cli, home, model_id, tmp_path, args, target, n):
    pics = small_folder(tmp_path / "pics")
    export = tmp_path / "export"
    if args[0] == "import":  # a library elsewhere made the export; this one starts empty
        from conftest import Cli

        other = Cli(tmp_path / "other-home", model_id)
        assert other("index", pics).exit_code == 0 and other("export", export, "-q").exit_code == 0
    elif args[0] != "--batch-size":  # album and forget work on an indexed library
        assert cli("index", pics).exit_code == 0
        assert cli("album", "save", "blues", "a blue circle").exit_code == 0
    photos_before = tree_of(pics)
    argv = [a.format(pics=pics, export=export) for a in args]
    killed_at(target, n, "--home", home, "--model", model_id, "--device", "cpu", "--precision", "fp32", *argv)
    with sqlite3.connect(home / "library.db") as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    st = ok_json(cli("status", "--json"))
    if args[2:3] == ("index",):
        assert st["last_run"]["state"] == "interrupted (process ended)" and st["images"] == 2  # one batch of 2
    r = cli(*argv)
    assert r.exit_code == 0, r.output
    st = ok_json(cli("status", "--json"))
    assert st["images"] == (5 if args[0] == "forget" else 6) and st["models"][0]["vectors"] == st["images"]
    assert tree_of(pics) == photos_before and strays(home) == []


def test_ctrl_c_at_a_write_records_only_the_batches_saved(settings, tmp_path, monkeypatch):
    """`status` showed an interrupted run's counts with the batch lost in flight: new 4 with 2 images there."""
    from dataclasses import replace

    from imgsearch import Library
    from imgsearch.store import Store

    pics = small_folder(tmp_path / "pics")
    real, writes = Store.write_batch, []

    def ctrl_c_at_the_second(self, *args, **kw):
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(Store, "write_batch", ctrl_c_at_the_second)
    with Library(settings=replace(settings, batch_size=2)) as lib:
        with pytest.raises(KeyboardInterrupt):
            lib.index([pics])
        st = lib.status()
    assert st.images == 2 and st.last_run["state"] == "interrupted"
    assert (st.last_run["new"], st.last_run["updated"], st.last_run["moved"]) == (2, 0, 0)
