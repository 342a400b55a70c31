"""`imgsearch index --ray`: the same library as a plain run, whatever happens to the Ray workers.

The Ray tests share one local Ray of 2 CPUs (starting one takes seconds; the failure test first runs on a
Ray of its own, as the command line does) and one plain-indexed reference library of the same folder.
"""

from __future__ import annotations

import sqlite3
import sys

import numpy as np
import pytest

from imgsearch import synthetic
from imgsearch.config import Settings


@pytest.fixture(scope="module")
def shared_ray():
    """Starts a local Ray of 2 CPUs when called (unless one runs); shut down after the module's tests."""
    import ray

    from imgsearch import distributed

    made: list[str] = []

    def ensure():
        if not ray.is_initialized():
            made.append(distributed.start_local(num_cpus=2))
        return ray

    yield ensure
    ray.shutdown()
    for temp_dir in made:
        distributed.remove_temp_dir(temp_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """54 generated JPEGs plus the three kinds of bad file a photo folder has."""
    folder = tmp_path_factory.mktemp("ray") / "photos"
    synthetic.generate(folder, per_class=3, size=96, fmt="jpg", seed=1, captions_file=None)
    good = sorted(folder.iterdir())[0].read_bytes()
    (folder / "corrupt.jpg").write_bytes(b"not an image at all")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model, folder):
    """The library a plain `index` makes of ``folder``."""
    from imgsearch.indexer import index_paths

    home = tmp_path_factory.mktemp("plain") / "home"
    settings = Settings(home=home, model=f"local-dir:{tiny_model}", pretrained=None, device="cpu",
                        precision="fp32", batch_size=8, workers=2)
    index_paths(settings, [folder])
    return _library(home)


def _library(home):
    """(image rows by id, vectors by id, failures): everything a user sees of an indexed folder."""
    con = sqlite3.connect(home / "library.db")
    try:
        rows = con.execute("SELECT id, path, hash, size, mtime_ns, width, height, taken_at FROM images "
                           "ORDER BY id").fetchall()
        vectors = {i: np.frombuffer(blob, dtype=np.float32) for i, blob in
                   con.execute("SELECT image_id, vector FROM vectors")}
        failures = sorted(con.execute("SELECT path, reason FROM failures").fetchall())
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()
    return rows, vectors, failures


def _assert_same(got, want):
    rows, vectors, failures = got
    assert rows == want[0]  # same ids, paths, hashes, sizes, pixel sizes
    assert failures == want[2] and len(failures) == 3
    assert vectors.keys() == want[1].keys()
    assert max(float(np.abs(vectors[i] - want[1][i]).max()) for i in vectors) <= 1e-6


@pytest.mark.slow
def test_a_failed_worker_keeps_the_library_and_a_rerun_completes_it(shared_ray, plain, folder, cli, home,
                                                                      monkeypatch, tmp_path):
    import os

    import ray

    from imgsearch import distributed

    # First on its own Ray, as the command line runs: started for the run, stopped when the run fails.
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("IMGSEARCH_BATCH_SIZE", "8")
    monkeypatch.setattr(distributed, "_TEST_FAULT", {"batch": 2, "how": "raise"})
    failed = cli("index", folder, "--ray")
    assert failed.exit_code == 1
    message = failed.output.strip().splitlines()[-1]
    assert message.startswith("error: the Ray run stopped (RuntimeError: test fault: encoder actor failed); "
                              "the batches written so far are kept, re-run the same command to finish; "
                              "Ray's logs are in ")
    logs = message.rsplit(" ", 1)[-1]
    assert os.path.isdir(logs) and not ray.is_initialized()
    distributed.remove_temp_dir(logs)
    rows, vectors, _ = _library(home)
    assert len(rows) < 54 and set(vectors) == {r[0] for r in rows}  # every row kept has its vector
    assert set(rows) <= set(plain[0])

    # The rerun loses its encoder process mid-run (a crashed node): Ray restarts it and the run completes.
    shared_ray()
    marker = tmp_path / "died"
    monkeypatch.setattr(distributed, "_TEST_FAULT", {"batch": 2, "how": "exit", "marker": str(marker)})
    rerun = cli("index", folder, "--ray")
    assert rerun.exit_code == 0, rerun.output
    assert marker.exists()  # the worker really died
    _assert_same(_library(home), plain)


@pytest.mark.slow
def test_ray_index_makes_the_library_a_plain_index_makes(shared_ray, plain, folder, cli, home, monkeypatch):
    shared_ray()
    monkeypatch.setenv("IMGSEARCH_BATCH_SIZE", "8")  # several batches through each stage
    result = cli("index", "--ray", folder)  # no address: before a folder it is the local Ray
    assert result.exit_code == 0, result.output
    assert "new 54, updated 0, unchanged 0, moved 0, removed 0, failed 3" in result.output
    assert "corrupt.jpg: not an image Pillow can read" in result.output
    assert "truncated.jpg: truncated image file" in result.output
    _assert_same(_library(home), plain)

    again = cli("index", folder, "--ray")
    assert again.exit_code == 0, again.output
    assert "new 0, updated 0, unchanged 54" in again.output and "3 files that failed before" in again.output


def test_ray_missing_says_to_install_the_extra(cli, folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = cli("index", folder, "--ray")
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --ray needs Ray, which is not installed; install the distributed "
                                     "extra: pip install 'imgsearch[distributed]'")


@pytest.mark.slow
def test_the_local_ray_refuses_clients_without_its_token(tmp_path):
    """Ray binds its ports on every interface: a process without this run's token must not get in."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    script = (
        "import os, subprocess, sys\n"
        "from imgsearch import distributed\n"
        "temp = distributed.start_local(num_cpus=1)\n"
        "import ray\n"
        "address = ray.get_runtime_context().gcs_address\n"
        "env = {k: v for k, v in os.environ.items() if not k.startswith('RAY_AUTH')}\n"
        "r = subprocess.run([sys.executable, '-c', f'import ray; ray.init(address={address!r}); print(1)'],\n"
        "                   env=env, capture_output=True, text=True, timeout=120)\n"
        "print('intruder', r.returncode, r.stdout.strip() or '-', os.environ['RAY_AUTH_MODE'])\n"
        "ray.shutdown()\n"
        "distributed.remove_temp_dir(temp)\n")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    line = [x for x in r.stdout.splitlines() if x.startswith("intruder")]
    assert line and line[0].split()[1] != "0" and line[0].split()[2] == "-" and line[0].endswith("token"), r.stderr[-2000:]
