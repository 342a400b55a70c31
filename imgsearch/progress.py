"""Progress bars on stderr: imgsearch's ``progress(done, total)`` callbacks drawn by tqdm, imported only when a
bar is drawn (so `--quiet`, `--json` and `--help` never load it)."""

from __future__ import annotations

import sys


class Bar:
    """A tqdm bar made on the first report, fed absolute counts: ``bar(done, total)``; a context manager.
    quiet: draw nothing. skip_empty: no bar for a job of 0 items. leave: keep the finished bar on screen.
    Extra keyword arguments go to tqdm (unit_scale, smoothing, initial, ...)."""

    def __init__(self, desc: str, unit: str = "img", *, quiet: bool = False, leave: bool = True,
                 skip_empty: bool = False, **options):
        self.desc, self.quiet, self.skip_empty = desc, quiet, skip_empty
        self._options = {"unit": unit, "leave": leave, **options}
        self._bar = None

    @property
    def open(self) -> bool:
        return self._bar is not None

    def _make(self, total: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=self.desc, file=sys.stderr, dynamic_ncols=True, **self._options)
        return self._bar

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or (self._bar is None and self.skip_empty and total == 0):
            return
        bar = self._bar or self._make(total)
        bar.n = done
        # A full redraw only at the end; in between tqdm redraws at its own pace (update(0)).
        bar.refresh() if done == total else bar.update(0)

    def start(self, total: int) -> None:
        """Draw the bar now (a job whose first report comes late, like training steps)."""
        if not self.quiet and self._bar is None:
            self._make(total)

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)

    def write(self, line: str) -> None:
        """A message line that does not tear the bar (printed plainly when no bar is open)."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
