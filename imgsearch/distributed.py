"""`imgsearch index --ray`: the decode and encode stages of an index run on Ray Data.

The driver walks the folders and writes SQLite as a plain run does (indexer.Indexer); Ray tasks read, hash
and decode files with the indexer's own ``_process``, and an actor pool holding the model encodes them.
Results stream back in order into the usual crash-safe batches (an interrupted run is resumed by running it
again). Workers read the files by the driver's paths: one machine, or a shared filesystem mounted alike on
every node. Ray is imported only here, and only when there is work.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import re
import secrets
import shutil
import sys
import tempfile
from types import SimpleNamespace

from .config import Settings, cpu_cores, is_ray_address
from .encoder import ModelSpec
from .errors import ImgSearchError, ModelLoadError, ParamError, UsageError
from .indexer import DecodeStage, Indexer, _Done

MISSING_RAY = ("--ray needs Ray, which is not installed; install the distributed extra: "
               "pip install 'imgsearch[distributed]'")
# Test hook: the encode actor fails on this batch of its process, {"batch": 2, "how": "exit" | "raise"};
# "exit" kills the process once (a crashed worker, which Ray restarts); "raise" is an error Ray gives up on.
_TEST_FAULT: dict | None = None


def object_store_bytes() -> int:
    """Shared memory for blocks in flight: the stream holds a few batches, so 1/16 of RAM within 0.5-4 GiB
    (1.5 GiB on a 24 GB machine) instead of Ray's default 30%, which would starve the encoder."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = 8 << 30
    return max(512 << 20, min(4 << 30, memory // 16))


class RayStage:
    """Decode and encode on Ray for one index run (``Indexer(remote=...)``)."""

    def __init__(self, settings: Settings, address: str | None = None):
        # None or "local": a Ray started for this run; "auto", "ray://host:10001", "host:6379": a cluster.
        if address is not None and not isinstance(address, str):
            raise ParamError("ray", 'give "local" (a Ray for this run), "auto" or an address such as ray://HOST:10001')
        self.address = None if address in (None, "local") else address
        if self.address is not None and not is_ray_address(address):
            raise UsageError(f"--ray {address!r} is not a Ray address; give auto, ray://HOST:10001 or "
                             "HOST:6379, or put --ray after the folders to start a local Ray")
        if self.address is None and settings.own_process:
            _require_token()  # before Ray is imported: it reads its authentication mode once, on import
        try:
            import ray
            import ray.data  # noqa: F401  (the extra, not just ray core)
        except ImportError:
            raise UsageError(MISSING_RAY) from None
        self.ray = ray
        if settings.precision == "int8":
            raise UsageError("--precision int8 is not available with --ray (its parity check runs locally); "
                             "use --precision fp32 or bf16")
        self.settings = settings
        self.temp_dir: str | None = None
        self.keep_logs = False  # the error message names the log folder: keep it
        self.started: bool | None = None  # None: not connected; True: this run's Ray; False: the caller's

    def open(self) -> None:
        """Connect now: a cluster address fails fast, before the model loads (a local Ray waits for work)."""
        if self.started is None:
            self.started = self._start()

    def close(self) -> None:
        started, self.started = self.started, None
        if started is False:
            _free_stopped_runs()
        elif started:
            with contextlib.suppress(Exception):
                self.ray.shutdown()
            if self.temp_dir and not self.keep_logs:
                remove_temp_dir(self.temp_dir)

    def describe(self) -> tuple[str, str]:
        return f"Pillow on Ray tasks ({self.address or 'a local Ray'})", "torch on Ray actors"

    # --- driver ------------------------------------------------------------------------------------
    def _start(self) -> bool:
        """Connect or start; True when this run started Ray (and so shuts it down)."""
        ray = self.ray
        if ray.is_initialized():
            _free_stopped_runs()
            return False  # the caller's Ray (a notebook, the tests): use it, leave it running
        if self.address is None:
            self.temp_dir = start_local(cpu_cores(), self.settings.own_process)
            return True
        try:
            with _quiet_backend(self.settings.own_process):
                # The workers import the driver's own imgsearch, so both sides run the same code version.
                ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=False,
                         runtime_env={"py_modules": [os.path.dirname(__file__)]})
        except Exception as e:
            raise UsageError(f"cannot connect to Ray at {self.address}: {_first_line(e)}; start the cluster "
                             "with `ray start --head`, or use --ray without an address for a local Ray") from None
        return True

    def _plan(self) -> dict:
        """Actor pool and resources from what the cluster has: one GPU per actor, else CPU actors."""
        resources = self.ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        if gpus and self.settings.device != "cpu":
            return {"device": "cuda", "actors": gpus, "threads": 1, "num_gpus": 1, "cpus": cpus}
        # Encoding costs ~10x decoding on a CPU: most cores go to encoder actors of a few threads each.
        threads = max(1, min(4, cpus // 2))
        return {"device": "cpu", "actors": max(1, (cpus - 1) // threads), "threads": threads, "num_gpus": 0,
                "cpus": cpus}

    def _pipeline(self, indexer: Indexer, work: list, known: frozenset):
        """The Ray Data plan: decode tasks, then the encoder actor pool; rows keep the work's order."""
        import numpy as np
        from ray.data import ActorPoolStrategy

        ray = self.ray
        plan = self._plan()
        enc = indexer.encoder
        batch = max(1, self.settings.batch_size)
        # A sorted array is shared zero-copy by the workers on a node; a Python set would be unpickled per task.
        known_ref = ray.put(np.array(sorted(known), dtype="S") if known else np.zeros(0, dtype="S1"))
        light = SimpleNamespace(preprocess=enc.preprocess, draft_size=enc.draft_size, device="cpu")
        per_block = max(1, min(4 * batch, -(-len(work) // (2 * plan["cpus"]))))
        rows = [{"i": i, "work": pickle.dumps(w, protocol=5)} for i, w in enumerate(work)]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per_block)))
        ctx = ds.context  # the dataset's own copy of Ray Data's settings: the process's DataContext stays alone
        ctx.execution_options.preserve_order = True  # rows come back in work order: the same ids as a plain run
        ctx.enable_progress_bars = False  # the driver's own bar counts files
        ctx.print_on_execution_start = False
        ds = ds.map_batches(
            _decode_batch, batch_size=batch, num_cpus=1,
            fn_kwargs={"settings": self.settings, "light": light, "known_ref": known_ref},
            # A decode worker holds torch (~0.5 GB measured), one full-size image and its batch of model inputs;
            # declared, it also keeps Ray from fusing decoding into the encoder actors (idling the model).
            memory=(768 << 20) + batch * 3 * enc.image_size ** 2 * 4)
        ds = ds.map_batches(
            _EncodeActor, batch_size=batch,
            compute=ActorPoolStrategy(min_size=1, max_size=plan["actors"]),
            num_cpus=plan["threads"], num_gpus=plan["num_gpus"],
            fn_constructor_kwargs={"spec": enc.spec, "device": plan["device"], "precision": self.settings.precision,
                                   "fingerprint": enc.fingerprint, "threads": plan["threads"],
                                   "fault": _TEST_FAULT})
        return ds

    def results(self, indexer: Indexer, work: list, known: frozenset):
        """One ``_Done`` per work item, in order; vectors come encoded by the actor pool."""
        self.open()
        failure = ds = stream = None
        quiet = _quiet_loggers(self.settings.own_process)
        try:
            quiet.__enter__()  # for the whole stream: Ray Data logs while it runs, too
            ds = self._pipeline(indexer, work, known)  # a Dataset keeps the settings it was made under
            stream = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
            waiting: dict[int, _Done] = {}  # out-of-order rows (none while Ray preserves order)
            nxt = 0
            try:
                for out in stream:
                    for i, blob, vec, has in zip(out["i"], out["done"], out["vec"], out["has"]):
                        done = pickle.loads(blob)
                        done.work = work[int(i)]
                        if has:
                            done.vector = vec
                        waiting[int(i)] = done
                    while nxt in waiting:
                        yield waiting.pop(nxt)
                        nxt += 1
            except ImgSearchError:
                raise
            except Exception as e:
                self.keep_logs = bool(self.temp_dir)  # the message names the folder
                failure = _root_cause(e)
            finally:
                # Stops the executor when the driver stops early (Ctrl-C, a failed write) or Ray failed.
                getattr(stream, "close", lambda: None)()
            if failure is None and nxt != len(work):
                failure = f"Ray returned {nxt} of {len(work)} files"
        finally:
            del ds, stream
            quiet.__exit__(None, None, None)
            self.close()
        if failure is not None:  # raised here, outside the except: nothing keeps Ray's traceback alive
            raise ImgSearchError(f"the Ray run stopped ({failure}); the batches written so far are kept, re-run "
                                 f"the same command to finish" + (f"; Ray's logs are in {self.temp_dir}"
                                                                  if self.keep_logs else ""))


def _root_cause(e: BaseException) -> str:
    """The worker's own error inside Ray's wrappers (RayTaskError around UserCodeException, the worker's
    traceback as text), as one line: the last "Name: message" line there that is not Ray's own."""
    cause = None
    for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines():
        m = re.match(r"^([A-Za-z_][\w.]*): (.+)$", line.strip())
        if m and not m[1].startswith("ray") and (m[1].endswith(("Error", "Exception")) or "." in m[1]):
            cause = m
    if cause is None:
        return _first_line(e)
    own = cause[1].startswith("imgsearch.")  # our own errors already say what to do: their message alone
    return (cause[2] if own else f"{cause[1].rsplit('.', 1)[-1]}: {cause[2]}")[:300]


def start_local(num_cpus: int, own_process: bool = True) -> str:
    """Start a Ray for this process alone, sized to the machine; returns its temporary folder. In someone
    else's program (not ``own_process``) Ray keeps its own token authentication (default since Ray 2.60)
    and log lines: this process's environment and stderr stay as they are."""
    if own_process:
        _require_token()

    import ray

    temp_dir = tempfile.mkdtemp(prefix="imgsearch-ray-")
    try:
        with _quiet_backend(own_process):
            ray.init(num_cpus=num_cpus, object_store_memory=object_store_bytes(),
                     _temp_dir=temp_dir, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    except BaseException:
        remove_temp_dir(temp_dir)
        raise
    return temp_dir


def _require_token() -> None:
    """A local Ray listens on every interface (0.0.0.0 whatever the node address), and anyone reaching its
    ports can run code as this user: the Ray we start accepts only clients holding a random token, which its
    processes inherit from this environment. Ray reads the mode once, on import, so this runs before; the
    token stays for the process's life. Ray already imported, or its authentication configured: theirs stands."""
    if "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def remove_temp_dir(temp_dir: str) -> None:
    # mkdtemp made this folder for one Ray run alone (sockets, logs): nothing in it is the user's.
    shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _quiet_backend(own: bool):
    """Around ray.init in imgsearch's own process (``own``): Ray's C++ core logs an error line on every actor
    pool Ray Data makes (ray-project/ray#53727), so its log level goes to fatal (unless the user set one),
    which prints a line at init, so init's stderr is muted. Failures still raise; the full logs stay in Ray's
    session folder. Both are process-wide, so in someone else's program Ray's lines are left to show."""
    if not own:
        yield
        return
    had = "RAY_BACKEND_LOG_LEVEL" in os.environ
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    sys.stderr.flush()
    saved_fd = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        if not had:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


@contextlib.contextmanager
def _quiet_loggers(own: bool):
    """Ray's Python loggers at ERROR for one index run in imgsearch's own process (``own``), restored after;
    a logger's level is process-wide, so in someone else's program they keep theirs."""
    levels = {n: logging.getLogger(n).level for n in ("ray", "ray.data")} if own else {}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _free_stopped_runs() -> None:
    # On a Ray that stays up (the caller's), a stopped run's actors live until the handles its executor keeps
    # are collected (seen with Ray 2.60); collect what is already garbage when a run ends and the next starts.
    gc.collect()


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


# --- worker side (run in Ray worker processes) ----------------------------------------------------
class _Known:
    """``hash in known`` over a sorted array of hashes (what Indexer._process asks of its known set)."""

    def __init__(self, array):
        self.array = array

    def __contains__(self, digest: str) -> bool:
        import numpy as np

        key = digest.encode()
        k = int(np.searchsorted(self.array, key))
        return k < len(self.array) and self.array[k] == key


class _FileSide:
    """What ``Indexer._process`` uses of an indexer (its settings and a Pillow decode stage), without the
    model, the store or the driver's threads."""

    _process = Indexer._process

    def __init__(self, settings: Settings, light):
        self.settings = settings
        self.stage = DecodeStage(light, settings.max_pixels, tensor=False)


_threads_set = False


def _decode_batch(batch: dict, settings: Settings, light, known_ref) -> dict:
    """Ray task: read, hash and decode a batch of files; model inputs go on to the encoder actors."""
    import numpy as np
    import ray

    global _threads_set
    if not _threads_set:  # once per worker process: each decode task has one CPU
        import torch

        torch.set_num_threads(1)
        _threads_set = True
    side = _FileSide(settings, light)
    known = _Known(ray.get(known_ref))
    n = len(batch["i"])
    done_col, px = np.empty(n, dtype=object), np.empty(n, dtype=object)
    empty = np.zeros((0, 0, 0), dtype=np.float32)
    for k, blob in enumerate(batch["work"]):
        work = pickle.loads(blob)
        try:
            done = side._process(work, known)
        except Exception as e:  # as images.decode_many does locally: one broken file never stops the run
            done = _Done(work, error=f"cannot decode: {type(e).__name__}: {e}")
        px[k] = done.tensor.numpy() if done.tensor is not None else empty
        done.tensor = done.work = None  # the driver has the work
        done_col[k] = pickle.dumps(done, protocol=5)
    return {"i": batch["i"], "done": done_col, "px": px}


class _EncodeActor:
    """Ray actor holding the model; checks it has the driver's weights before encoding anything."""

    def __init__(self, spec: ModelSpec, device: str, precision: str, fingerprint: str, threads: int,
                 fault: dict | None = None):
        import torch

        from . import encoder

        if device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = encoder.load(spec, device, precision)
        if self.encoder.fingerprint != fingerprint:
            raise ModelLoadError(f"the weights of {spec.label} on this Ray worker differ from the driver's "
                                 "(another file at the same path?); give every node the same model files")
        self.fault, self.batches = fault, 0

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        self.batches += 1
        if self.fault and self.batches == self.fault["batch"]:
            if self.fault["how"] == "raise":
                raise RuntimeError("test fault: encoder actor failed")
            if not os.path.exists(self.fault["marker"]):  # once per run: the restarted actor goes on
                open(self.fault["marker"], "w").close()
                os._exit(1)
        px = batch["px"]
        has = np.array([p.size > 0 for p in px], dtype=bool)
        vec = np.zeros((len(px), self.encoder.dim), dtype=np.float32)
        if has.any():
            vec[has] = self.encoder.encode_image_tensors(torch.from_numpy(np.stack([p for p in px if p.size])))
        return {"i": batch["i"], "done": batch["done"], "vec": vec, "has": has}

