"""Hostile and unlucky use of the library (issue 12): a replaced database, truncated caches, concurrent
writers, read-only homes, full disks, crafted file names, absurd weights and killed runs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from imgsearch import synthetic


def hits_of(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def cli_cmd(home: Path, model_id: str, *args) -> list[str]:
    """The CLI as a separate process (as a second terminal would run it)."""
    return [sys.executable, "-m", "imgsearch", "--home", str(home), "--model", model_id, "--device", "cpu",
            "--precision", "fp32", *[str(a) for a in args]]


def db_count(home: Path, table: str) -> int:
    with sqlite3.connect(home / "library.db") as c:
        return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# --- point 5: a replaced library.db never trusts the old FAISS cache ------------------------------------
def test_replaced_database_never_trusts_the_old_cache(cli, home, tmp_path):
    """Same model id, version and fingerprint in a new library.db: the old cache maps ids to other images."""
    first, second = tmp_path / "first", tmp_path / "second"
    synthetic.generate(first / "a", per_class=6, colors=["blue"], shapes=("triangle",), captions_file=None)
    synthetic.generate(first / "b", per_class=6, colors=["red"], shapes=("circle",), captions_file=None)
    synthetic.generate(second / "a", per_class=6, colors=["red"], shapes=("circle",), captions_file=None)
    synthetic.generate(second / "b", per_class=6, colors=["blue"], shapes=("triangle",), captions_file=None)
    assert cli("index", first).exit_code == 0
    from imgsearch.store import Store
    from imgsearch.vectors import VectorIndex

    cache = home / "index" / "model-1.faiss"
    old_cache = tmp_path / "first.faiss"
    shutil.copy(cache, old_cache)
    aside = tmp_path / "aside"
    aside.mkdir()
    for p in home.glob("library.db*"):  # "move it aside", as the old error message advised
        p.rename(aside / p.name)
    assert cli("index", second).exit_code == 0
    s = Store(home / "library.db", create=False)
    model = s.model_by_id(1)
    s.close()
    old_header = VectorIndex.read_meta(old_cache)
    # The situation of the report: the first library's cache matches every key the old code compared.
    assert (old_header["model_id"], old_header["version"], old_header["fingerprint"]) == \
        (model.id, model.version, model.fingerprint)
    # Ids 1-6 are blue triangles in the first library and red circles in the second: a trusted stale cache
    # answers with the first library's vectors under the second library's paths.
    got = hits_of(cli("query", "a red circle", "-k", "12", "--json"))
    cache.unlink()  # the truth: an index built from this library.db alone
    truth = hits_of(cli("query", "a red circle", "-k", "12", "--json"))
    assert [(h["path"], h["score"]) for h in got] == [(h["path"], h["score"]) for h in truth]
    shutil.copy(old_cache, cache)  # a stale cache put back (e.g. restored from a backup)
    st = json.loads(cli("status", "--json").stdout)["models"][0]
    assert st["index_state"].startswith("stale") and "another library" in st["index_state"]
    again = hits_of(cli("query", "a red circle", "-k", "12", "--json"))
    assert [(h["path"], h["score"]) for h in again] == [(h["path"], h["score"]) for h in truth]
    assert json.loads(cli("status", "--json").stdout)["models"][0]["index_state"] == "ok"


def test_old_library_gets_an_identity_on_upgrade(tmp_path):
    from imgsearch.migrations import SCHEMA_VERSION
    from imgsearch.store import Store

    a = Store(tmp_path / "a" / "library.db")
    b = Store(tmp_path / "b" / "library.db")
    assert a.library_id and b.library_id and a.library_id != b.library_id
    a.close()
    b.close()
    with sqlite3.connect(tmp_path / "a" / "library.db") as c:  # back to a schema-3 library
        for table in ("album_vectors", "album_pins", "albums"):  # undo migration 6
            c.execute(f"DROP TABLE {table}")
        for index in ("ix_images_taken_at", "ix_images_taken_utc", "ix_images_gps"):  # undo migration 5
            c.execute(f"DROP INDEX {index}")
        for column in ("taken_utc", "taken_offset", "taken_source", "gps_lat", "gps_lon", "camera_make",
                       "camera_model"):
            c.execute(f"ALTER TABLE images DROP COLUMN {column}")
        c.execute("DROP TABLE library_meta")
        c.execute("ALTER TABLE runs DROP COLUMN pid")
        c.execute("DELETE FROM schema_migrations WHERE version >= 4")
    s = Store(tmp_path / "a" / "library.db")
    assert s.schema_version == SCHEMA_VERSION and len(s.library_id) == 32
    s.close()


def test_truncated_cache_is_reported_damaged_and_rebuilt(cli, home, photos):
    assert cli("index", photos).exit_code == 0
    cache = home / "index" / "model-1.faiss"
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])
    st = json.loads(cli("status", "--json").stdout)["models"][0]
    assert st["index_state"].startswith("damaged")
    assert "index damaged" in cli("status").stdout
    assert len(hits_of(cli("query", "a red circle", "-k", "54", "--json"))) == 54
    assert json.loads(cli("status", "--json").stdout)["models"][0]["index_state"] == "ok"


# --- point 11: one writer at a time ---------------------------------------------------------------------
def _read_stderr_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    seen = b""
    deadline = time.time() + timeout
    while time.time() < deadline and needle.encode() not in seen:
        ready, _, _ = select.select([proc.stderr], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def test_forget_waits_for_the_writer_holding_the_library(cli, home, model_id, photos):
    from imgsearch.lock import write_lock

    assert cli("index", photos).exit_code == 0
    target = photos / "red_circle_000.jpg"
    with write_lock(home):  # this test process is "the other run"
        proc = subprocess.Popen(cli_cmd(home, model_id, "forget", target), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        said = _read_stderr_until(proc, "waiting", timeout=60)
        assert f"another imgsearch run (pid {os.getpid()}) is writing to this library; waiting" in said
        time.sleep(0.5)
        assert proc.poll() is None and db_count(home, "images") == 54  # it waits, it does not write
    out, rest = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert b"removed 1 image" in out and db_count(home, "images") == 53
    assert said.count("waiting") == 1 and b"waiting" not in rest  # said once


def test_no_wait_fails_clearly_while_another_run_writes(cli, home, model_id, photos):
    from imgsearch.lock import write_lock

    assert cli("index", photos).exit_code == 0
    with write_lock(home):
        r = subprocess.run(cli_cmd(home, model_id, "forget", "--no-wait", photos), capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert f"another imgsearch run (pid {os.getpid()}) is writing to this library" in r.stderr
    assert db_count(home, "images") == 54


@pytest.mark.slow
def test_two_index_runs_at_once_both_succeed(home, model_id, photos):
    procs = [subprocess.Popen(cli_cmd(home, model_id, "index", "--json", "-q", photos), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, errs) in zip(procs, results):
        assert p.returncode == 0, errs
        assert "Error" not in errs and "internal error" not in errs
    reports = sorted((json.loads(out)["new"], json.loads(out)["unchanged"]) for out, _ in results)
    assert reports == [(0, 54), (54, 0)]  # one after the other, never interleaved
    assert db_count(home, "images") == 54 and db_count(home, "vectors") == 54


def test_sql_errors_never_carry_raw_data(tmp_path):
    import sqlalchemy as sa
    from sqlalchemy import text

    from imgsearch.store import Store

    s = Store(tmp_path / "library.db")
    blob = bytes(range(256)) * 16
    with pytest.raises(sa.exc.IntegrityError) as info:
        with s.begin() as c:
            c.execute(text("INSERT INTO vectors (model_id, image_id, vector) VALUES (:m, :i, :v)"),
                      {"m": 999, "i": 999, "v": blob})
    s.close()
    message = str(info.value)
    assert "FOREIGN KEY" in message and "\\x00\\x01" not in message and len(message) < 1000


def test_internal_errors_are_one_short_line():
    import typer
    from typer.testing import CliRunner

    from imgsearch.commands import handle_errors

    app = typer.Typer()

    @app.command()
    @handle_errors
    def boom():
        raise RuntimeError("first line\n" + "\x00\xff" * 5000)

    r = CliRunner().invoke(app, [])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and len(lines[0]) < 500
    assert "internal error: RuntimeError: first line" in lines[0]


# --- point 12: read-only home, full disk ------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_read_only(home: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``home`` truly read-only: a read-only bind mount when root (chmod does not stop root),
    else the permissions taken away."""
    if os.geteuid() == 0:
        script = 'mount --bind "$H" "$H" && mount -o remount,bind,ro "$H" && exec "$@"'
        return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cmd], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "H": str(home)})
    subprocess.run(["chmod", "-R", "a-w", str(home)], check=True)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(home)], check=True)


def _read_only_possible() -> bool:
    if os.geteuid() != 0:
        return True
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind /tmp /tmp"], capture_output=True).returncode == 0


def test_read_only_library_answers_queries_and_writes_nothing(cli, home, model_id, photos):
    if not _read_only_possible():  # root without mount namespaces: chmod would prove nothing
        pytest.skip("running as root without permission to make a read-only bind mount")
    assert cli("index", photos).exit_code == 0
    truth = hits_of(cli("query", "a red circle", "-k", "5", "--json"))
    (home / "index" / "model-1.faiss").unlink()
    before = _snapshot(home)
    r = _run_read_only(home, cli_cmd(home, model_id, "query", "a red circle", "-k", "5", "--json"))
    assert r.returncode == 0, r.stderr
    assert [(h["path"], h["score"]) for h in json.loads(r.stdout)] == [(h["path"], h["score"]) for h in truth]
    st = _run_read_only(home, cli_cmd(home, model_id, "status"))
    assert st.returncode == 0 and "read-only" in st.stdout, st.stderr
    ix = _run_read_only(home, cli_cmd(home, model_id, "index", photos))
    assert ix.returncode == 1 and len(ix.stderr.strip().splitlines()) == 1
    assert "write access" in ix.stderr and "move it aside" not in ix.stderr
    assert _snapshot(home) == before  # nothing written, nothing removed


def test_damaged_database_advice_keeps_a_copy(cli, home):
    home.mkdir(parents=True)
    (home / "library.db").write_bytes(b"not a database at all " * 200)
    r = cli("status")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "Copy it somewhere safe first" in r.stderr and "move it aside" not in r.stderr


def test_full_disk_is_one_line_and_the_library_stays_intact(cli, home, tmp_path, monkeypatch):
    from sqlalchemy import event

    from imgsearch.store import Store

    folder = tmp_path / "pics"
    synthetic.generate(folder / "a", per_class=2, size=48, captions_file=None)
    assert cli("index", folder).exit_code == 0
    before = db_count(home, "images")
    synthetic.generate(folder / "b", per_class=8, size=48, captions_file=None, seed=9)

    real = Store._migrate

    def full_after_migrate(self):
        real(self)

        @event.listens_for(self.engine, "connect")
        def _no_room(dbapi_conn, _record):  # SQLite answers SQLITE_FULL as on a full disk
            n = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
            dbapi_conn.execute(f"PRAGMA max_page_count = {n}")

        self.engine.dispose()

    monkeypatch.setattr(Store, "_migrate", full_after_migrate)
    r = cli("index", "-q", folder)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert f"disk full while writing the library at {home}" in r.stderr and "MB free" in r.stderr
    assert "internal error" not in r.stderr
    with sqlite3.connect(home / "library.db") as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db_count(home, "images") == before
    monkeypatch.setattr(Store, "_migrate", real)
    rep = json.loads(cli("index", folder, "--json").stdout)
    assert rep["unchanged"] == before and rep["new"] == len(list(folder.rglob("*.png"))) - before


# --- point 4: crafted names and xargs ---------------------------------------------------------------------
CRAFTED = "red\nvictim.txt\nx.png"


@pytest.fixture()
def crafted(tmp_path) -> Path:
    folder = tmp_path / "crafted"
    synthetic.generate(folder, per_class=2, size=64, captions_file=None)
    synthetic.draw_shape("red", "circle", 64, random.Random(6)).save(folder / CRAFTED)
    (folder / "bad\x1bname.jpg").write_bytes(b"not an image")
    return folder


def test_print0_gives_names_verbatim_and_lines_escape_them(cli, crafted):
    r = cli("index", crafted)
    assert r.exit_code == 0
    assert "failed: $'" in r.stdout and "bad\\x1bname.jpg'" in r.stdout and "\x1b" not in r.stdout
    r = cli("query", "a red circle", "-k", "40", "--print0")
    assert r.exit_code == 0
    names = r.stdout_bytes.split(b"\0")
    assert names[-1] == b"" and str(crafted / CRAFTED).encode() in names[:-1]
    r = cli("query", "a red circle", "-k", "40", "--paths")
    lines = r.stdout.splitlines()
    assert "victim.txt" not in lines and "x.png" not in lines and len(lines) == 37
    assert f"$'{crafted}/red\\nvictim.txt\\nx.png'" in lines
    assert "1 name with control characters shown escaped" in r.stderr and "--print0" in r.stderr
    r = cli("query", "a red circle", "-k", "40")
    assert len(r.stdout.splitlines()) == 38 and "red\\nvictim.txt" in r.stdout
    r = cli("status", "--failures")
    assert r.stdout.count("\n") == 1 and "bad\\x1bname.jpg" in r.stdout


def test_xargs_0_reaches_only_the_named_file(cli, crafted, tmp_path):
    """The README's pipeline acts on exactly the files found, never on a name spliced from a crafted one."""
    assert cli("index", crafted).exit_code == 0
    (crafted / "victim.txt").write_text("not a result")
    dest = tmp_path / "picked"
    dest.mkdir()
    out = cli("query", "a red circle", "-k", "40", "--print0").stdout_bytes
    r = subprocess.run(["xargs", "-0", "cp", "-t", str(dest), "--"], input=out, capture_output=True)
    assert r.returncode == 0, r.stderr
    picked = sorted(p.name for p in dest.iterdir())
    assert CRAFTED in picked and "victim.txt" not in picked and len(picked) == 37


def test_duplicates_and_classify_lines_escape_names_as_query_does(cli, crafted):
    shutil.copyfile(crafted / CRAFTED, crafted / "copy.png")
    assert cli("index", crafted).exit_code == 0
    escaped = f"$'{crafted}/red\\nvictim.txt\\nx.png'"
    r = cli("duplicates")
    lines = r.stdout.splitlines()  # the group, its two files, the summary: no name split over lines
    assert r.exit_code == 0 and len(lines) == 4 and any(line.endswith(escaped) for line in lines), r.stdout
    assert "1 name with control characters shown escaped" in r.stderr and "--json" in r.stderr
    r = cli("classify", crafted / CRAFTED, "--labels", "red,blue")
    assert r.exit_code == 0 and r.stdout.splitlines() == [f"{escaped}\tred 1.00"], r.stdout


# --- point 15: absurd weights and scores, killed runs ----------------------------------------------------
def test_overflowing_weight_is_rejected(cli):
    r = cli("query", "1" * 400 + ":a red circle")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "out of range" in r.stderr and "between -1000 and 1000" in r.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_numeric_min_score_is_rejected(cli, value):
    r = cli("query", "a red circle", "--min-score", value)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"--min-score {value}: give a cosine score between -1 and 1" in r.stderr


@pytest.mark.slow
def test_killed_run_shows_as_interrupted(cli, home, model_id, tmp_path):
    photos = tmp_path / "many"
    synthetic.generate(photos, per_class=6, size=48, captions_file=None)
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
                    "--batch-size", "4", "index", "-q", {str(photos)!r}]
        app()
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if db_count(home, "vectors") >= 8:
                break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.2)
    assert proc.poll() is None, "indexing finished before it could be killed"
    running = cli("status", "--json")
    assert json.loads(running.stdout)["last_run"]["state"] == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    st = json.loads(cli("status", "--json").stdout)
    assert st["last_run"]["state"] == "interrupted (process ended)" and st["last_run"]["finished_at"] is None
    line = [x for x in cli("status").stdout.splitlines() if x.startswith("last run")]
    assert len(line) == 1 and "interrupted (process ended" in line[0]


@pytest.mark.slow
def test_a_photo_dated_after_2262_is_indexed_with_the_rest(cli, tmp_path):
    """Its modification time in nanoseconds is past SQLite's integer range: writing it failed the whole batch
    (an internal error of index, of the web page's index form; the watcher of serve --watch stopped)."""
    photos = tmp_path / "photos"
    synthetic.generate(photos, per_class=1, colors=["red", "blue"], shapes=["circle", "square"], size=64,
                       fmt="jpg", seed=1, captions_file=None)
    late = photos / "red_circle_000.jpg"
    os.utime(late, (32503680000, 32503680000))  # the year 3000: a wrong clock, or `touch -d`
    if os.stat(late).st_mtime_ns < 1 << 63:
        pytest.skip("this file system cannot date a file after 2262")
    first = cli("index", photos, "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["new"] == 4 and json.loads(first.stdout)["failures"] == []
    assert hits_of(cli("query", "a red circle", "-k", "1", "--json"))[0]["path"] == str(late)
    again = json.loads(cli("index", photos, "--json").stdout)
    assert again["unchanged"] == 4 and again["updated"] == 0  # its date is kept the same way each time
