"""CLIP's byte-level BPE tokenizer without torch: the same token ids as open_clip's SimpleTokenizer.

open_clip's tokenizer module imports torch (seconds on a small CPU), so the cold text path carries its own.
Cleaning, pre-tokenising pattern, merge order and truncation follow SimpleTokenizer(clean="lower"); the
exporter checks the ids against open_clip on a hard prompt set before an export is used.
ftfy and regex are imported only for text that needs them: for printable ASCII without '&', ftfy.fix_text
and html.unescape change nothing, and \\p{L}/\\p{N} reduce to [a-z]/[0-9] after lower-casing.
"""

from __future__ import annotations

import gzip
import re
from functools import lru_cache
from pathlib import Path

SOT = "<start_of_text>"
EOT = "<end_of_text>"
N_MERGES = 49152 - 256 - 2  # merges CLIP's vocabulary was built from (the file holds more)

_ASCII_PAT = re.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+",
                        re.IGNORECASE)
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e]*")  # printable ASCII except '&'
_memos: dict[tuple[str, str], tuple[dict, dict, dict]] = {}  # (merges, vocab) -> (rank, id, pre-token memos)


def byte_alphabet() -> tuple[list[str], list[str]]:
    """GPT-2/CLIP's reversible byte mapping: (character of each byte value, the base vocabulary order).

    Printable bytes stand for themselves; the others get chr(256 + k) in byte order. The vocabulary lists
    the printable ones first, then the remapped ones, so ids are not byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    keep = set(printable)
    by_byte: dict[int, str] = {b: chr(b) for b in printable}
    order = [chr(b) for b in printable]
    for b in range(256):
        if b not in keep:
            by_byte[b] = chr(256 + len(order) - len(printable))
            order.append(by_byte[b])
    return [by_byte[b] for b in range(256)], order


MERGES_TXT = "bpe_merges.txt"
VOCAB_TXT = "bpe_vocab.txt"


def read_merges(gz_path: str | Path) -> list[str]:
    """The merge lines ("a b") CLIP uses, in rank order, from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    raw = Path(gz_path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8").split("\n")[1:N_MERGES + 1]  # first line is a version header


def write_tables(gz_path: str | Path, folder: str | Path) -> None:
    """Plain-text merge and vocabulary tables (one entry per line, line number = rank / id) for fast start."""
    merges = "\n".join(read_merges(gz_path))
    _, base = byte_alphabet()
    vocab = base + [c + "</w>" for c in base] + [merges.replace(" ", ""), SOT, EOT]  # symbols hold no space
    Path(folder, MERGES_TXT).write_text(merges, encoding="utf-8")
    Path(folder, VOCAB_TXT).write_text("\n".join(vocab), encoding="utf-8")


class BPETokenizer:
    """Encode texts to CLIP token ids ([sot] ids [eot], truncated to the context length).

    Building open_clip's two 49k-entry dicts took 0.2-0.3 s, most of a cold query's budget. Instead the
    tables stay one newline-delimited string each and a lookup is a substring search plus a newline count
    (line number = merge rank or token id), memoised: a query touches a few dozen entries. The memos are shared
    by all tokenizers over the same tables (every export copies one file) so that each new export's parity
    check does not redo them. rfind, because open_clip's dicts keep the last of duplicate entries.
    """

    def __init__(self, folder: str | Path, context_length: int = 77):
        folder = Path(folder)
        self._merges = "\n" + (folder / MERGES_TXT).read_text(encoding="utf-8") + "\n"
        self._vocab = "\n" + (folder / VOCAB_TXT).read_text(encoding="utf-8") + "\n"
        self.alphabet, _ = byte_alphabet()
        self._rank_memo, self._id_memo, self._memo = _memos.setdefault((self._merges, self._vocab), ({}, {}, {}))
        self.sot_id = self._id(SOT)
        self.eot_id = self._id(EOT)
        self.context_length = int(context_length)
        self._memo.update({SOT: [self.sot_id], EOT: [self.eot_id]})
        self._full_pat = None

    def _rank(self, pair: tuple[str, str]) -> int | None:
        try:
            return self._rank_memo[pair]
        except KeyError:
            pass
        pos = self._merges.rfind(f"\n{pair[0]} {pair[1]}\n")
        rank = self._merges.count("\n", 0, pos) if pos >= 0 else None
        self._rank_memo[pair] = rank
        return rank

    def _id(self, token: str) -> int:
        got = self._id_memo.get(token)
        if got is None:
            pos = self._vocab.rfind(f"\n{token}\n")
            if pos < 0:
                raise KeyError(token)
            got = self._id_memo[token] = self._vocab.count("\n", 0, pos)
        return got

    # --- cleaning ------------------------------------------------------------------------------
    @staticmethod
    def clean(text: str) -> str:
        if _PLAIN.fullmatch(text):
            return " ".join(text.split()).lower()
        import html

        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _pieces(self, text: str) -> list[str]:
        if text.isascii():
            return _ASCII_PAT.findall(text)
        if self._full_pat is None:
            import regex

            self._full_pat = regex.compile(
                r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                regex.IGNORECASE)
        return self._full_pat.findall(text)

    # --- BPE -----------------------------------------------------------------------------------
    def _merge(self, piece: str) -> list[int]:
        """Token ids of one pre-token: apply the lowest-ranked adjacent merge until none applies."""
        hit = self._memo.get(piece)
        if hit is not None:
            return hit
        symbols = [self.alphabet[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = self._rank(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            a, b = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        out = [self._id(s) for s in symbols]
        self._memo[piece] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of the cleaned text without start/end tokens."""
        out: list[int] = []
        for piece in self._pieces(self.clean(text)):
            out.extend(self._merge(piece))
        return out

    def __call__(self, texts: list[str]) -> list[list[int]]:
        """[sot] + ids + [eot] per text; over-long texts keep the first tokens and end with eot."""
        rows = []
        n = self.context_length
        for text in texts:
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot_id
            rows.append(ids)
        return rows


@lru_cache(maxsize=4)
def load(folder: str, context_length: int) -> BPETokenizer:
    return BPETokenizer(folder, context_length)
