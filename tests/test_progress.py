"""The one progress-bar adapter the commands share (index, eval, finetune)."""

from __future__ import annotations

import subprocess
import sys

from imgsearch.progress import Bar


def test_bar_draws_counts_on_stderr_and_closes(capsys):
    with Bar("indexing") as bar:
        bar(0, 4)
        bar(2, 4)
        bar(4, 4)
        assert bar.open
    assert not bar.open
    err = capsys.readouterr().err
    assert "indexing" in err and "4/4" in err


def test_quiet_and_empty_jobs_draw_nothing(capsys):
    quiet = Bar("indexing", quiet=True)
    quiet(1, 3)
    quiet.start(3)
    empty = Bar("indexing", skip_empty=True)
    empty(0, 0)
    assert not quiet.open and not empty.open
    assert capsys.readouterr().err == ""


def test_messages_print_plainly_without_a_bar_and_around_one(capsys):
    bar = Bar("fine-tuning", "step")
    bar.write("note: first")
    bar.start(10)
    bar.advance(3, "loss 0.5")
    bar.write("val R@1 0.9")
    bar.close()
    err = capsys.readouterr().err
    assert "note: first\n" in err and "val R@1 0.9" in err and "3/10" in err and "loss 0.5" in err


def test_quiet_bar_never_imports_tqdm():
    code = ("import sys; from imgsearch.progress import Bar; b = Bar('x', quiet=True); b(1, 2); b.close(); "
            "print('tqdm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
