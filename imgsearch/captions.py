"""Read image–caption pairs from CSV/TSV, JSONL or a folder of images with sidecar .txt captions (for
`finetune`, `eval retrieval` and `caption --import`). Bad rows are collected with their line numbers; a file
that cannot be used at all raises DataError."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import read_json
from .errors import DataError
from .files import FileEntry, abspath, walk


@dataclass(frozen=True)
class Pair:
    path: str  # absolute image path
    caption: str
    line: int | None = None  # where it came from (1-based, header is line 1), None for sidecars


@dataclass
class CaptionSet:
    source: str
    pairs: list[Pair] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)


def read_captions(source: str | os.PathLike, image_col: str = "path", caption_col: str = "caption") -> CaptionSet:
    """Parse ``source`` (.csv, .tsv, .jsonl/.ndjson, or a folder with sidecar .txt files)."""
    src = Path(source)
    if not src.exists():
        raise DataError(f"captions source not found: {source}")
    if src.is_dir():
        result = _read_sidecars(src)
    else:
        suffix = src.suffix.lower()
        if suffix in (".csv", ".tsv"):
            result = _read_table(src, "\t" if suffix == ".tsv" else ",", image_col, caption_col)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            result = _read_jsonl(src, image_col, caption_col)
        else:
            raise DataError(f"{source}: unknown captions format {suffix or '(no extension)'}; use .csv, .tsv, "
                            ".jsonl or a folder of images with .txt sidecars")
    if not result.pairs and not result.problems:  # empty, a header alone, or a folder without sidecars
        raise DataError(f"{source} holds no captions; {_what_to_add(src, image_col, caption_col)}")
    problem = {path: _problem(path, src.parent) for path in {p.path for p in result.pairs}}
    result.problems += [(f"{result.source}:{p.line}" if p.line else result.source, problem[p.path])
                        for p in result.pairs if problem[p.path]]
    result.pairs = [p for p in result.pairs if problem[p.path] is None]
    return result


def _what_to_add(src: Path, image_col: str, caption_col: str) -> str:
    if src.is_dir():
        return "put a .txt file beside each image (beach.txt for beach.jpg), one caption a line"
    if src.suffix.lower() in (".csv", ".tsv"):
        sep = "<tab>" if src.suffix.lower() == ".tsv" else ","
        return (f"it needs the header line {image_col}{sep}{caption_col} and one line per caption after it, e.g. "
                f"photos/beach.jpg{sep}a dog on the beach")
    return f'add one JSON object per caption, e.g. {{"{image_col}": "photos/beach.jpg", "{caption_col}": "a dog"}}'


def _problem(path: str, base: Path) -> str | None:
    """Why the image at ``path`` cannot be used, None when it can; ``base``: where relative paths start."""
    if os.path.isfile(path):
        return None
    if os.path.exists(path):
        return f"not a regular file: {path}"
    rel = os.path.relpath(path, abspath(base))  # found from the current folder: the file was written from there
    hint = not rel.startswith("..") and os.path.isfile(rel)
    return f"image not found: {path}" + ("; paths are relative to the captions file's folder, not the current one:"
                                         " write them from there, or in full" if hint else "")


def _resolve(base: Path, raw: str) -> str:
    raw = raw.strip()
    return abspath(raw if os.path.isabs(os.path.expanduser(raw)) else base / raw)


def _read_table(path: Path, delimiter: str, image_col: str, caption_col: str) -> CaptionSet:
    out = CaptionSet(str(path))
    base = path.parent
    try:
        with open(path, newline="", encoding=_encoding(path)) as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:  # empty: read_captions says what to add
                return out
            header = [h.strip() for h in header]
            missing = [c for c in (image_col, caption_col) if c not in header]
            if missing:
                raise DataError(f"{path}: no column {', '.join(repr(m) for m in missing)} in header "
                                f"({', '.join(header)}); rename with --image-col / --caption-col")
            ii, ci = header.index(image_col), header.index(caption_col)
            start = reader.line_num + 1
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    out.problems.append((f"{path}:{line}", f"expected {len(header)} fields, found {len(row)}"))
                    continue
                if start > line + 1 and any(  # a row over several lines, one of them a row of an image of ours:
                        os.path.isfile(_resolve(base, rest.partition(delimiter)[0]))  # a quote left open ate it
                        for rest in row[ci].splitlines()[1:] if delimiter in rest):
                    out.problems.append((f"{path}:{line}", f"a quote opened in this row is not closed at its end, so "
                                                           f"the rows up to line {start - 1} were read as its "
                                                           "caption; close the quote"))
                    continue
                _add(out, base, line, {image_col: row[ii], caption_col: row[ci]}, image_col, caption_col)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed {('TSV' if delimiter == chr(9) else 'CSV')}: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return out


def _encoding(path: str | os.PathLike) -> str:
    """UTF-16 when the file starts with its byte-order mark (Excel's "Unicode Text", Notepad's "Unicode"),
    else UTF-8 with or without one."""
    with open(path, "rb") as f:
        return "utf-16" if f.read(2) in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """A UTF-8 or UTF-16 text file (a BOM dropped), or a one-line DataError; ``what`` names the kind of file in
    messages."""
    name = f"{what} file {path}" if what else str(path)
    try:
        return Path(path).read_text(encoding=_encoding(path))
    except FileNotFoundError:
        raise DataError(f"{what or 'text'} file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{name} is a folder; give a text file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {name}: {e.strerror or e}") from None


def _read_jsonl(path: Path, image_col: str, caption_col: str) -> CaptionSet:
    out = CaptionSet(str(path))
    text, rows = read_text(path), []
    # A .json file holding one array of objects (problems named by item number); .jsonl is one object a line
    array = path.suffix.lower() == ".json" and text.lstrip().startswith("[")
    if array:
        try:
            rows = list(enumerate(read_json(text), start=1))
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON ({e}); give an array of objects, or one object per line"
                            ) from None
    for line_no, line in enumerate(() if array else text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, read_json(line)))
        except ValueError as e:
            out.problems.append((f"{path}:{line_no}", f"not valid JSON ({e.msg})"))
    for line_no, obj in rows:
        if not isinstance(obj, dict):
            out.problems.append((f"{path}:{line_no}", "expected a JSON object"))
            continue
        _add(out, path.parent, line_no, obj, image_col, caption_col)
    return out


def _add(out: CaptionSet, base: Path, line: int, obj: dict, image_col: str, caption_col: str) -> None:
    """One row (a JSON object, or a table row as one) as pairs, or as the problems that stop it."""
    where = f"{out.source}:{line}"
    missing = [c for c in (image_col, caption_col) if c not in obj]
    if missing:
        out.problems.append((where, f"missing field '{missing[0]}'"))
        return
    img, cap = obj[image_col], obj[caption_col]
    if not isinstance(img, str):
        out.problems.append((where, f"field '{image_col}' is {_json_kind(img)}; it must be the image path as text"))
        return
    if not img.strip():
        out.problems.append((where, "empty image path"))
        return
    # Only text is a caption: str(None) would store the caption "None", str(5) the caption "5".
    caps = cap if isinstance(cap, list) else [cap]
    if not caps:
        out.problems.append((where, "empty caption list"))
    for n, c in enumerate(caps, start=1):
        which = f"caption {n} in '{caption_col}'" if isinstance(cap, list) else f"field '{caption_col}'"
        if not isinstance(c, str):
            out.problems.append((where, f"{which} is {_json_kind(c)}; a caption must be text"))
        elif not c.strip():
            out.problems.append((where, "empty caption"))
        else:
            out.pairs.append(Pair(_resolve(base, img), c.strip(), line))


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return "a list" if isinstance(value, list) else "an object"


def _read_sidecars(folder: Path) -> CaptionSet:
    """photo.jpg + photo.txt; each non-empty line of the .txt is one caption."""
    out = CaptionSet(str(folder))
    for item in walk([folder]):
        if not isinstance(item, FileEntry):
            out.problems.append((item.path, item.reason))
            continue
        sidecar = Path(item.path).with_suffix(".txt")
        if not sidecar.is_file():
            continue
        try:
            caps = [ln.strip() for ln in read_text(sidecar, "caption").splitlines() if ln.strip()]
        except DataError as e:  # names the sidecar
            out.problems.append((item.path, str(e)))
            continue
        if not caps:
            out.problems.append((str(sidecar), "empty caption"))
        out.pairs.extend(Pair(item.path, c) for c in caps)
    return out
