"""imgsearch inside someone else's Python program changes nothing of that program's process: not its
environment, thread counts, logging, warnings filters or signal handlers, and not torch's functions, not
even for a moment on another of its threads.

Each check runs in a fresh interpreter (the host program), so pytest's own process state plays no part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The host: a program that uses torch and has not configured logging (a root logger without handlers is
# what makes logging.basicConfig work later; a library that logs through the root logger takes that away).
HOST_STATE = r"""
import json, logging, os, signal, sys, warnings
import PIL.Image
import torch

# A thread count of the host's own, different from the one imgsearch would pick for itself.
torch.set_num_threads(1 if len(os.sched_getaffinity(0)) != 1 else 2)

def state():
    loggers = {"": logging.root, **logging.root.manager.loggerDict}
    return {
        "environ": dict(os.environ),
        "threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
        "logging_disable": logging.root.manager.disable,
        "loggers": {n: [l.level, [repr(h) for h in l.handlers], l.disabled, l.propagate]
                    for n, l in loggers.items() if isinstance(l, logging.Logger)},
        "warnings": [repr(f) for f in warnings.filters],
        "recursion": sys.getrecursionlimit(),
        "pillow": PIL.Image.MAX_IMAGE_PIXELS,  # (Pillow fills its plugin registry itself on first use)
        "signals": [repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)],
        "torch": [repr(getattr(torch.nn.init, n)) for n in sorted(dir(torch.nn.init)) if n.endswith("_")]
                 + [repr(torch.nn.Module.load_state_dict), str(torch.get_default_dtype()),
                    torch.is_grad_enabled(), torch.backends.mha.get_fastpath_enabled()],
    }

home, model, photos = sys.argv[1:4]
before = state()
import imgsearch

with imgsearch.Library(home, f"local-dir:{model}", device="cpu", precision="fp32", batch_size=8) as lib:
    lib.index(photos)
    text_hits = lib.search("a red circle", k=3)
    image_hits = lib.search(image=os.path.join(photos, sorted(os.listdir(photos))[0]), k=3)
    tagged = lib.classify(["a red circle", "a blue square"]).images
after = state()
changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
if "environ" in changed:
    b, a = changed["environ"]
    changed["environ"] = {k: [b.get(k), a.get(k)] for k in set(b) | set(a) if b.get(k) != a.get(k)}
if "loggers" in changed:  # loggers made meanwhile are the libraries' own
    b, a = changed["loggers"]
    changed["loggers"] = {k: [b[k], a.get(k)] for k in b if b[k] != a.get(k)} or None
    if changed["loggers"] is None:
        del changed["loggers"]
print(json.dumps({"changed": changed, "hits": len(text_hits) + len(image_hits), "classified": tagged}))
"""

# The host builds torch modules on a thread of its own while imgsearch loads a model. The handshake runs
# inside the checkpoint read, so the host's modules are made while the load is certainly under way.
HOST_THREAD = r"""
import json, sys, threading
import safetensors.torch
import torch

SEEDS = range(20)
reference = {}
for s in SEEDS:  # what the host's layers are with nothing else going on
    torch.manual_seed(s)
    reference[s] = torch.nn.Linear(48, 48).weight.detach().clone()

go, done = threading.Event(), threading.Event()
report = {"built": 0, "uninitialised": 0, "not_cpu": 0, "aliased": 0}

def host():
    go.wait(600)
    try:
        for s in SEEDS:
            torch.manual_seed(s)
            layer = torch.nn.Linear(48, 48)
            report["built"] += 1
            if layer.weight.device.type != "cpu":
                report["not_cpu"] += 1
                continue
            if not torch.equal(layer.weight.detach(), reference[s]):
                report["uninitialised"] += 1
            state = {"weight": torch.randn(48, 48), "bias": torch.randn(48)}
            layer.load_state_dict(state)  # copies: the state dict stays the host's own
            state["weight"].zero_()
            if not layer.weight.detach().any() or layer.weight.data_ptr() == state["weight"].data_ptr():
                report["aliased"] += 1
    finally:
        done.set()

real_load_file = safetensors.torch.load_file

def load_file(*args, **kwargs):  # open_clip reads the checkpoint through this, mid-load
    go.set()
    done.wait(600)
    return real_load_file(*args, **kwargs)

safetensors.torch.load_file = load_file
thread = threading.Thread(target=host)
thread.start()
from imgsearch.encoder import ModelSpec, build

enc = build(ModelSpec(f"local-dir:{sys.argv[1]}"), "cpu", "fp32")
thread.join()
report["dim"] = enc.dim
print(json.dumps(report))
"""


def _host(code: str, *args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_indexing_and_searching_leave_the_host_process_as_it_was(tiny_model, tmp_path):
    from imgsearch import synthetic

    photos = tmp_path / "photos"
    synthetic.generate(photos, per_class=1, size=64, fmt="jpg", seed=1, captions_file=None)
    out = _host(HOST_STATE, tmp_path / "home", tiny_model, photos)
    assert out["hits"] == 6 and out["classified"] == 18  # it did the work
    assert out["changed"] == {}


@pytest.mark.slow
def test_a_host_thread_building_modules_during_a_model_load_gets_ordinary_modules(tiny_model):
    out = _host(HOST_THREAD, tiny_model)
    assert out["dim"] == 64 and out["built"] == 20
    # Initialised as torch would with that seed, on the CPU; load_state_dict copied, as it does.
    assert (out["uninitialised"], out["not_cpu"], out["aliased"]) == (0, 0, 0)
