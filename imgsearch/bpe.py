"""CLIP's byte-level BPE tokenizer without torch (whose import takes seconds on a small CPU): the token ids of
open_clip's SimpleTokenizer(clean="lower"), which the exporter checks before an export is used. ftfy and regex
are imported only for text that needs them: for printable ASCII without '&', ftfy.fix_text and html.unescape
change nothing, and \\p{L}/\\p{N} reduce to [a-z]/[0-9] after lower-casing."""

from __future__ import annotations

import re
import zlib
from functools import lru_cache
from pathlib import Path

SOT = "<start_of_text>"
EOT = "<end_of_text>"
N_MERGES = 49152 - 256 - 2  # merges CLIP's vocabulary was built from (the file holds more)
MAX_TABLE_BYTES = 16 << 20  # CLIP's tables are 1.4 MB unpacked, tokenizer.json ~4 MB: past this, refused

_ASCII_PAT = re.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+",
                        re.IGNORECASE)
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e]*")  # printable ASCII except '&'
_memos: dict[tuple[str, str], tuple[dict, dict, dict]] = {}  # (merges, vocab) -> (rank, id, pre-token memos)


def clean_whitespace(text: str) -> str:
    """open_clip's "whitespace" cleaning (ftfy, HTML entities, runs of spaces), ftfy only when needed."""
    if not _PLAIN.fullmatch(text):
        import html

        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


def byte_alphabet() -> tuple[list[str], list[str]]:
    """GPT-2/CLIP's reversible byte mapping: (character of each byte value, the base vocabulary order).
    Printable bytes stand for themselves, the others get chr(256 + k); the vocabulary lists printable ones first."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = sorted(set(range(256)) - set(printable))
    by_byte = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}
    return [by_byte[b] for b in range(256)], [by_byte[b] for b in printable + others]


MERGES = "bpe_simple_vocab_16e6.txt.gz"  # open_clip's packaged BPE table
MERGES_TXT = "bpe_merges.txt"
VOCAB_TXT = "bpe_vocab.txt"


def read_merges(gz_path: str | Path) -> list[str]:
    """The merge lines ("a b") CLIP uses, in rank order, from open_clip's bpe_simple_vocab_16e6.txt.gz, a
    Hugging Face merges.txt or tokenizer.json. A file (or its gzip contents) past MAX_TABLE_BYTES is a
    ValueError: a few kilobytes of gzip could otherwise unpack to gigabytes."""
    path = Path(gz_path)
    too_big = f"{path} is larger than a BPE table can be ({MAX_TABLE_BYTES >> 20} MB)"
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise ValueError(too_big)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        unpack, parts, size, data = zlib.decompressobj(16 + zlib.MAX_WBITS), [], 0, raw
        while not unpack.eof:  # a megabyte at a time, so a bomb is stopped at the cap, not after it
            chunk = unpack.decompress(data, 1 << 20)
            data, size = unpack.unconsumed_tail, size + len(chunk)
            if size > MAX_TABLE_BYTES:
                raise ValueError(f"{too_big} once unpacked")
            if not chunk and not data:
                raise ValueError(f"{path} is cut short (its gzip stream ends early); download it again")
            parts.append(chunk)
        raw = b"".join(parts)
    if raw.lstrip()[:1] == b"{":
        from .config import read_json

        merges = read_json(raw)["model"]["merges"]  # "a b" strings, or [a, b] pairs in newer files
        return [m if isinstance(m, str) else " ".join(m) for m in merges][:N_MERGES]
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
    Building open_clip's two 49k-entry dicts took 0.2-0.3 s, most of a cold query's budget. Instead each table
    stays one newline-delimited string and a lookup is a substring search plus a newline count (line number =
    rank or id), memoised (shared by tokenizers over the same tables). rfind: open_clip's dicts keep the last
    of duplicate entries."""

    def __init__(self, folder: str | Path, context_length: int = 77):
        folder = Path(folder)
        self._merges = "\n" + (folder / MERGES_TXT).read_text(encoding="utf-8") + "\n"
        self._vocab = "\n" + (folder / VOCAB_TXT).read_text(encoding="utf-8") + "\n"
        self.alphabet, _ = byte_alphabet()
        self._rank_memo, self._id_memo, self._memo = _memos.setdefault((self._merges, self._vocab), ({}, {}, {}))
        self.sot_id, self.eot_id = self._id(SOT), self._id(EOT)
        self.context_length = int(context_length)
        self._memo.update({SOT: [self.sot_id], EOT: [self.eot_id]})
        self._full_pat = None

    def _rank(self, pair: tuple[str, str]) -> int | None:
        if pair not in self._rank_memo:
            pos = self._merges.rfind(f"\n{pair[0]} {pair[1]}\n")
            self._rank_memo[pair] = self._merges.count("\n", 0, pos) if pos >= 0 else None
        return self._rank_memo[pair]

    def _id(self, token: str) -> int:
        got = self._id_memo.get(token)
        if got is None:
            pos = self._vocab.rfind(f"\n{token}\n")
            if pos < 0:
                raise KeyError(token)
            got = self._id_memo[token] = self._vocab.count("\n", 0, pos)
        return got

    def _pieces(self, text: str) -> list[str]:
        if text.isascii():
            return _ASCII_PAT.findall(text)
        if self._full_pat is None:
            import regex

            self._full_pat = regex.compile(
                r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                regex.IGNORECASE)
        return self._full_pat.findall(text)

    def _merge(self, piece: str) -> list[int]:
        """Token ids of one pre-token: apply the lowest-ranked adjacent merge until none applies."""
        if piece in self._memo:
            return self._memo[piece]
        symbols = [self.alphabet[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            ranked = [(r, pair) for pair in zip(symbols, symbols[1:]) if (r := self._rank(pair)) is not None]
            if not ranked:
                break
            a, b = min(ranked)[1]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        out = self._memo[piece] = [self._id(s) for s in symbols]
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of the cleaned text without start/end tokens."""
        return [i for piece in self._pieces(clean_whitespace(text).lower()) for i in self._merge(piece)]

    def __call__(self, texts: list[str]) -> list[list[int]]:
        """[sot] + ids + [eot] per text; over-long texts keep the first tokens and end with eot."""
        n = self.context_length
        rows = [[self.sot_id, *self.encode(text), self.eot_id] for text in texts]
        return [ids if len(ids) <= n else ids[:n - 1] + [self.eot_id] for ids in rows]


@lru_cache(maxsize=4)
def load(folder: str, context_length: int) -> BPETokenizer:
    return BPETokenizer(folder, context_length)
