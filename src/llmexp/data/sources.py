"""Load raw rows with `datasets`: registered datasets (built-in or plugins'), local files, or the hub."""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional

from llmexp.config.schema import DataConfig
from llmexp.errors import UserError, suggest

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# The most rows a plugin's builder may yield as an iterator (a list or a Dataset has its own end).
MOST_GENERATED_ROWS = 2_000_000  # (about 1.5 GB of chat rows held at once)


def load_raw(cfg: DataConfig, in_mixture: bool = False):
    """The configured split as a `datasets.Dataset` (plus a validation split when named); a
    mixture's source (``in_mixture``) holds no validation split of its own."""
    if cfg.source == "bundled":
        return _bundled(cfg), None
    if cfg.source == "files":
        return _files(cfg), None
    return _hub(cfg, in_mixture)


def _bundled(cfg: DataConfig):
    """Rows of a dataset registered through the ``llmexp_datasets`` hook (llmexp's or a plugin's)."""
    import dataclasses

    from datasets import Dataset

    from llmexp.plugins.registry import lookup

    entry = lookup("llmexp_datasets", cfg.name, "data.name")
    decl = entry.declaration
    names = {f.name for f in dataclasses.fields(decl.options)} if decl.options else set()
    unknown = set(cfg.options) - names
    if unknown:
        raise UserError(f"data.options: unknown option(s) {sorted(unknown)} for dataset "
                        f"{cfg.name!r}; valid: {', '.join(sorted(names)) or 'none'}")
    options = decl.options(**cfg.options) if decl.options else None
    from llmexp.plugins.manager import raised_at

    builder = getattr(decl.builder, "__qualname__", None) or "its builder"
    where = f"data.name: dataset {cfg.name!r} of {entry.owner}: {builder}()"
    try:
        rows = decl.builder(options, cfg.seed)
        if rows is None or not (isinstance(rows, Dataset) or hasattr(rows, "__iter__")) or isinstance(rows, (str, dict)):
            raise UserError(f"{where} returned {'None' if rows is None else type(rows).__name__}; fix: return "
                            f"the rows (a list or iterator of dicts) or a datasets.Dataset")
        ds = rows if isinstance(rows, Dataset) else _table(where, rows)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin's bug: name it (LLMEXP_TRACEBACK=1 shows where)
        raise UserError(f"data.name: dataset {cfg.name!r} of {entry.owner}: {builder}() failed: "
                        f"{type(e).__name__}: {e}{raised_at(e, entry.owner)}") from e
    if len(ds) == 0:
        raise UserError(f"data.options: dataset {cfg.name!r} built no rows with options {cfg.options}")
    return ds


def described(cfg: DataConfig) -> str:
    """The data as messages about its rows name it: a plugin's dataset with its plugin (its author
    fixes the rows), else the file or dataset name."""
    if cfg.source == "bundled":
        from llmexp.plugins.registry import datasets

        entry = datasets().get(cfg.name)
        if entry is not None:
            return entry.describe("dataset")
    return repr(cfg.path or cfg.name)


def _table(where: str, rows: Iterable[Any]):
    """A plugin's rows as a Dataset; rows it cannot be (not dicts, a field of two kinds of value,
    which pyarrow said as 'Could not convert 'q' with type str') named by row and field."""
    import pyarrow
    from datasets import Dataset

    listed = []
    endless = not isinstance(rows, (list, tuple))  # a generator may never end: it filled memory, silently
    for n, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise UserError(f"{where} made row {n} a {type(row).__name__}; fix: make each row a dict of its columns")
        if endless and n > MOST_GENERATED_ROWS:
            raise UserError(f"{where} made more than {MOST_GENERATED_ROWS:,} rows and had not ended; fix: make the "
                            f"builder stop (it gets its options, e.g. a num_samples), or for more rows return a "
                            f"datasets.Dataset, or write them to files for data=files data.streaming=true")
        listed.append(dict(row))
    # Dataset.from_list takes the first row's columns and drops the others' silently (a prompt/
    # completion row among chat rows became a row without messages): every row gets every column.
    columns = list(dict.fromkeys(key for row in listed for key in row))
    if any(len(row) != len(columns) for row in listed):
        listed = [{c: row.get(c) for c in columns} for row in listed]
    try:
        return Dataset.from_list(listed)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, TypeError, ValueError):
        conflict = _row_kind_conflict(listed)
        if conflict is None:
            raise
        raise UserError(f"{where} made rows that do not fit one table: {conflict}; fix: give each field one kind of "
                        f"value in every row (text for a message's content)") from None


def _row_kind_conflict(rows: List[dict]) -> Optional[str]:
    """The first field, nested ones included (a message's content), whose value is of another kind
    than the same field's earlier (in an earlier row, or an earlier item of a list), said with both
    places (rows counted from 1)."""
    first: Dict[str, tuple] = {}  # field, list items alike ('messages[].content') -> (kind, its first place)

    def walk(value: Any, field: str, place: str) -> Optional[str]:
        kind = "object" if isinstance(value, dict) else "list" if isinstance(value, list) else _json_kind(value)
        if kind is None:
            return None
        seen = first.setdefault(field, (kind, place))
        if seen[0] != kind:
            return f"{place} is {_article(kind)}, but {_article(seen[0])} at {seen[1]}"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            sub = (f"{field}[]", f"{place}[{key}]") if isinstance(value, list) else (f"{field}.{key}", f"{place}.{key}")
            found = walk(child, *sub)
            if found:
                return found
        return None

    for n, row in enumerate(rows, 1):
        for key, value in row.items():
            found = walk(value, key, f"row {n} {key}")
            if found:
                return found
    return None


def data_files(path: str) -> List[str]:
    """The data files a file, directory or glob names: JSONL/JSON/Parquet/CSV or plain text (.txt,
    one row per line), each possibly compressed (.gz, .zst, .bz2, .xz), all of one kind."""
    p = Path(os.path.expanduser(path))
    if p.is_dir():  # structured files, else plain text ones
        inside = _files_inside(p)
        found = [str(f) for f in inside if _data_suffix(f) in FILE_BUILDERS] \
            or [str(f) for f in inside if _data_suffix(f) in TEXT_SUFFIXES]
    else:
        found = sorted(glob.glob(os.path.expanduser(path)))
    if not found:
        raise UserError(f"data.path: no JSONL/JSON/Parquet/CSV/text file at {path!r}")
    kinds = {FILE_BUILDERS.get(_data_suffix(Path(f)), "text" if _data_suffix(Path(f)) in TEXT_SUFFIXES else None)
             for f in found}
    if None in kinds or len(kinds) > 1:
        raise UserError(f"data.path: {path!r} must name files of one kind among "
                        f"{', '.join([*FILE_BUILDERS, *TEXT_SUFFIXES])} (optionally compressed: "
                        f"{', '.join(sorted(COMPRESSED))}); found {sorted({''.join(Path(f).suffixes) for f in found})}")
    return found


def _files_inside(directory: Path) -> List[Path]:
    """Every file under ``directory``, in order, hidden ones (and those in hidden directories) left out."""
    return [f for f in sorted(directory.rglob("*")) if f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(directory).parts)]


def text_files_left_out(path: str) -> List[str]:
    """The text files of a directory that data.path reads the structured files of (they win)."""
    p = Path(os.path.expanduser(path))
    if not p.is_dir():
        return []
    inside = _files_inside(p)
    if not any(_data_suffix(f) in FILE_BUILDERS for f in inside):
        return []
    return [str(f.relative_to(p)) for f in inside if _data_suffix(f) in TEXT_SUFFIXES
            and f.name.split(".")[0].lower() not in (*DOC_STEMS, "requirements")]


def open_binary(path: str):
    """A file for reading bytes, decompressed by its suffix (.gz, .bz2, .xz, .zst)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if suffix == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    if suffix == ".xz":
        import lzma

        return lzma.open(path, "rb")
    if suffix == ".zst":
        import io

        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _check_text_files(files: List[str]) -> None:
    """Report the first malformed (JSONL) or non-UTF-8 (JSONL, CSV) line with its file and number
    (datasets does not say which)."""
    for f in files:
        if os.path.getsize(f) == 0:
            raise UserError(f"data.path: {f} is empty")
        rows = 0
        for n, row in _json_rows(f):
            rows += 1
            if not isinstance(row, dict):
                raise UserError(f"data.path: {f} line {n} is not a JSON object")
        if not rows and _data_suffix(Path(f)) == ".jsonl":
            raise UserError(f"data.path: {f} holds no rows, only blank lines")
        if _data_suffix(Path(f)) == ".csv":
            for _ in _text_lines(f):  # datasets' reader logged two lines and named no line
                pass


def _text_lines(f: str) -> Iterator[tuple]:
    """(number, text) of each line of a text file, the first line that is not UTF-8 named."""
    with open_binary(f) as fh:
        for n, raw in enumerate(fh, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM (Windows' editors) is not a row's text
            except UnicodeDecodeError as e:
                raise not_utf8(f, n, raw, e) from None


def not_utf8(f: str, n: int, raw: bytes, e: UnicodeDecodeError) -> UserError:
    """The error for line ``n`` of file ``f`` that is not UTF-8 (datasets and the decoder name neither)."""
    return UserError(f"data.path: {f} line {n} is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                     f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8")


def _json_rows(f: str) -> Iterator[tuple]:
    """(line, value) of each non-blank line of a JSONL file (nothing for other kinds)."""
    if _data_suffix(Path(f)) != ".jsonl":
        return
    for n, line in _text_lines(f):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"data.path: {f} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None


def _json_kind(value: Any) -> Optional[str]:
    """The kind of a JSON value as one column of a table holds it (None: missing, fits any)."""
    if value is None:
        return None
    if isinstance(value, list):
        inner = next((_json_kind(v) for v in value if v is not None), None)
        return f"a list of {inner}s" if inner else None
    return ("true/false" if isinstance(value, bool) else "number" if isinstance(value, (int, float))
            else "text" if isinstance(value, str) else "object")


def _kind_conflict(files: List[str]) -> Optional[str]:
    """The first field of JSONL rows whose values differ in kind between lines, said with both
    places: why datasets could not read them ('Couldn't cast ...', or after its pandas fallback
    'Expected object or value'). Asked only when it failed: where it reads such rows, the rows'
    own check names each one with its fix."""
    kinds: Dict[str, tuple] = {}  # field -> (kind, file, place) where it was first seen
    for f in files:
        for place, row in _placed_rows(f):
            for field, value in (row.items() if isinstance(row, dict) else ()):
                kind = _json_kind(value)
                first = kinds.setdefault(field, (kind, f, place)) if kind else None
                if first and first[0] != kind:
                    at = first[2] if first[1] == f else f"{first[1]} {first[2]}"
                    return (f"{f} {place}: {field!r} is {_article(kind)}, but {_article(first[0])} at {at}; "
                            f"a field holds one kind of value in every row: fix {place} (or the rows like {at})")
    return None


def _placed_rows(f: str) -> Iterator[tuple]:
    """(place, row) of a JSONL file's lines ("line 3") or a JSON file's array ("row 3")."""
    if _data_suffix(Path(f)) == ".jsonl":
        yield from ((f"line {n}", row) for n, row in _json_rows(f))
        return
    try:
        with open_binary(f) as fh:
            rows = json.loads(fh.read().decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError):
        return  # not one JSON array: datasets' own error says what it is
    if isinstance(rows, list):
        yield from ((f"row {n}", row) for n, row in enumerate(rows, 1))


def json_kind_conflict(cfg: DataConfig) -> Optional[str]:
    """For data=files of JSON/JSONL: a field whose values differ in kind between rows (see
    _kind_conflict), else None. When such rows do load, datasets read them through pandas, which
    also turns text like "3" into the number 3 in other columns: every row then fails its check
    ("content 3, not text") while the cause is one row elsewhere."""
    if cfg.source != "files" or not cfg.path:
        return None
    files = data_files(cfg.path)
    if FILE_BUILDERS.get(_data_suffix(Path(files[0]))) != "json":
        return None
    return _kind_conflict(files)


def _article(kind: str) -> str:
    return kind if kind.startswith("a ") else {"text": "text", "true/false": "true/false"}.get(
        kind, f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}")


def csv_as_written(path: str) -> Dict[str, Any]:
    """The csv loader's options that keep every cell the text it is: pandas read an answer column
    of numbers as int ('6') and the answers NA, None or null as missing, and neither can be fixed
    in the file."""
    import csv
    import io

    from datasets import Features, Value

    with io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", errors="replace", newline="") as fh:
        header = next(csv.reader(fh), [])
    return {"features": Features({c: Value("string") for c in header}), "keep_default_na": False,
            "na_values": [""]} if header else {}  # an empty cell is still a missing one


def row_places(cfg: DataConfig) -> Optional[Callable[[int], str]]:
    """For data=files of JSONL or CSV: where the n-th row (from 0) is written, as 'line L' (one
    file) or '<file> line L' (a directory's or a glob's); rows are asked for in increasing order.
    None for other sources and kinds (their rows are counted from 1)."""
    if cfg.source != "files":
        return None
    files = data_files(cfg.path)
    if _data_suffix(Path(files[0])) not in (".jsonl", ".csv"):
        return None
    base = Path(os.path.expanduser(cfg.path))
    name = (lambda f: "line") if [Path(f) for f in files] == [base] else \
        (lambda f: f"{os.path.relpath(f, base) if base.is_dir() else f} line")
    state = {"n": -1, "place": "", "rows": _row_lines(files)}

    def locate(n: int) -> str:
        if n < state["n"]:  # asked out of order: read again from the start
            state.update(n=-1, rows=_row_lines(files))
        while state["n"] < n:
            found = next(state["rows"], None)
            if found is None:
                return f"row {n + 1}"
            state["n"] += 1
            state["place"] = f"{name(found[0])} {found[1]}"
        return state["place"]

    return locate


def _row_lines(files: List[str]) -> Iterator[tuple]:
    """(file, line) of each row as datasets reads them: JSONL's non-blank lines, CSV's records
    after the header (a record's last line where a quoted cell spans lines)."""
    import csv
    import io

    for f in files:
        if _data_suffix(Path(f)) == ".csv":
            with io.TextIOWrapper(open_binary(f), encoding="utf-8-sig", errors="replace", newline="") as fh:
                reader = csv.reader(fh)
                next(reader, None)
                for record in reader:
                    if record:
                        yield f, reader.line_num
        else:
            with open_binary(f) as fh:
                for n, raw in enumerate(fh, 1):
                    if raw.strip():
                        yield f, n


def _files(cfg: DataConfig):
    from datasets import load_dataset

    files = data_files(cfg.path)
    _check_text_files(files)
    unread = text_files_left_out(cfg.path)
    if unread:  # by design, but unsaid: a run on the one JSONL file beside a corpus said "1 row is too few"
        print(f"note: data.path: {cfg.path} holds structured files, which are read, and {len(unread)} text file(s), "
              f"which are not ({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''}); for the text give a glob, "
              f"e.g. data.path='{os.path.join(cfg.path, '*.txt')}'", file=sys.stderr)
    builder = FILE_BUILDERS.get(_data_suffix(Path(files[0])), "text")
    options = {**(csv_as_written(files[0]) if builder == "csv" else {}), **cfg.options}
    try:
        ds = load_dataset(builder, data_files=files, split="train", **options)
    except TypeError as e:  # an option the builder does not take
        raise UserError(f"data.options: {', '.join(sorted(cfg.options)) or 'none'} given, and datasets' {builder} "
                        f"loader refuses them ({str(e).splitlines()[0]}); data.options of data=files are its "
                        f"keyword arguments (data.source=files keeps another dataset's options: use data=files)") from None
    except Exception as e:  # datasets raises many kinds here; all mean the files are unreadable
        if "corresponds to no data" in str(e):  # a CSV file of its header alone, say
            raise UserError(f"data.path: {cfg.path!r} holds no rows" + (
                " (a CSV file is a header line, then one line per row)" if builder == "csv" else "")) from None
        conflict = _kind_conflict(files) if builder == "json" else None
        if builder == "text" and "codec can't decode" in _reason(e):  # which file and line (it named the glob)
            for f in files:
                for _ in _text_lines(f):
                    pass
        raise UserError(f"data.path: {conflict}" if conflict else
                        f"data.path: cannot read {cfg.path!r} as {builder}: {_reason(e)}") from None
    if len(ds) == 0:
        raise UserError(f"data.path: {cfg.path!r} holds no rows")
    return ds


def _reason(error: Exception) -> str:
    """What datasets' error says: its cause where it only says 'An error occurred while generating
    the dataset' (a field holding a string in one file and a list in another)."""
    if type(error).__name__ == "DatasetGenerationError" and error.__cause__ is not None:
        cause = " ".join(str(error.__cause__).split())
        if "cast" in cause:
            return (f"{cause}: a field holds values of different types in different rows or files (e.g. "
                    f"text in one, a list in another); give each field one type")
        return cause
    return str(error).splitlines()[0]


def _hub(cfg: DataConfig, in_mixture: bool = False):
    from datasets import load_dataset, load_from_disk

    local = Path(os.path.expanduser(cfg.path))
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = load_from_disk(str(local))
            if not hasattr(loaded, "keys"):  # one Dataset, saved without splits
                if cfg.validation_split:
                    raise UserError(f"data.validation_split={cfg.validation_split}: {cfg.path!r} is one dataset without "
                                    f"splits; unset data.validation_split (data.val_fraction of its rows are held out)")
                return loaded, None
            for key, split in (("data.split", cfg.split), ("data.validation_split", cfg.validation_split)):
                if split and split not in loaded:
                    raise UserError(f"{key}={split}: {cfg.path!r} has no split {split!r}; "
                                    f"{suggest(split, list(loaded), key)}")
            unused = [k for k in loaded if k != cfg.split and k in VALIDATION_NAMES]
            if not cfg.validation_split and unused and not in_mixture:  # rows of train were held out, silently
                print(f"note: data.path: {cfg.path} has a {unused[0]!r} split, which is not used: "
                      f"data.val_fraction of {cfg.split!r} is held out instead (data.validation_split={unused[0]} "
                      f"validates on it)", file=sys.stderr)
            return loaded[cfg.split], loaded[cfg.validation_split] if cfg.validation_split else None
        if local.is_dir() and not card_names_files(local):
            return _local_directory(cfg, local)
        train = load_dataset(cfg.path, split=cfg.split, **cfg.options)
        val = load_dataset(cfg.path, split=cfg.validation_split, **cfg.options) if cfg.validation_split else None
    except (KeyError, ValueError, FileNotFoundError, ConnectionError) as e:
        raise UserError(f"data.path: cannot load {cfg.path!r} (split {cfg.split!r}): {str(e).splitlines()[0]}") from None
    return train, val


# Split names a dataset's validation rows go by.
VALIDATION_NAMES = ("validation", "valid", "val", "dev", "test")
# Files in a dataset directory that describe it and are never its rows.
DOC_STEMS = {"readme", "license", "licence", "notice", "changelog", "citation", "contributing", "authors"}
COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
TEXT_SUFFIXES = {".txt"}  # plain-text corpora (one row per line), used only when no structured file is there


def card_names_files(directory: Path) -> bool:
    """Whether the directory's README.md card declares its data files (``configs:`` in its YAML
    header, as hub datasets do): then `datasets` follows the card."""
    card = directory / "README.md"
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    return any(line.startswith("configs:") for line in header.splitlines())


def _data_suffix(path: Path) -> str:
    """The suffix naming a file's kind, under a compression suffix (rows.jsonl.gz: .jsonl)."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def local_dataset_files(directory: Path) -> List[Path]:
    """The data files of a local dataset directory: JSONL/JSON/Parquet/CSV files (plain .txt files
    only when there are none of those), never its README, licence or other docs, nor hidden files."""
    found = [f for f in sorted(directory.rglob("*")) if f.is_file()
             and not any(part.startswith(".") for part in f.relative_to(directory).parts)
             and f.name.split(".")[0].lower() not in DOC_STEMS]
    structured = [f for f in found if _data_suffix(f) in FILE_BUILDERS]
    files = structured or [f for f in found if _data_suffix(f) in TEXT_SUFFIXES]
    if not files:
        others = ", ".join(sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file())[:8])
        raise UserError(f"data.path: the directory {str(directory)!r} holds no data files (JSONL/JSON/Parquet/CSV, or "
                        f".txt); it has: {others or 'nothing'}. Point data.path at the data files or at a directory "
                        f"holding them (a dataset saved with save_to_disk works too)")
    kinds = {FILE_BUILDERS.get(_data_suffix(f), "text") for f in files}
    if len(kinds) > 1:
        raise UserError(f"data.path: the directory {str(directory)!r} holds data files of several kinds "
                        f"({', '.join(sorted({_data_suffix(f) for f in files}))}); keep one kind, or point "
                        f"data.path at the files of one kind with data=files")
    return files


def _local_directory(cfg: DataConfig, directory: Path):
    """A local dataset directory that is not a save_to_disk one: its data files (never its README),
    split by file name the way `datasets` splits a hub dataset (train*, validation*/dev*, test*)."""
    from datasets import load_dataset
    from datasets.data_files import DataFilesDict, get_data_patterns

    files = local_dataset_files(directory)
    try:
        base = str(directory.resolve())
        by_split = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
        ours = {f.resolve(): f for f in files}
        splits = {str(name): [ours[Path(f).resolve()] for f in found if Path(f).resolve() in ours]
                  for name, found in by_split.items()}
    except FileNotFoundError:  # no split names: every file is training data
        splits = {}
    splits = {name: found for name, found in splits.items() if found} or {"train": files}
    builder = FILE_BUILDERS.get(_data_suffix(files[0]), "text")
    if builder == "json":
        _check_text_files([str(f) for f in files if f.suffix.lower() not in COMPRESSED])

    def load(split: str):
        if split not in splits:
            raise UserError(f"data.split: the directory {str(directory)!r} has no split {split!r} (its files make "
                            f"the splits {', '.join(sorted(splits))}, by their names); set data.split / "
                            f"data.validation_split to one of them")
        try:
            return load_dataset(builder, data_files={split: [str(f) for f in splits[split]]}, split=split,
                                **cfg.options)
        except Exception as e:  # datasets raises many kinds here; all mean the files are unreadable
            raise UserError(f"data.path: cannot read the {split} files of {str(directory)!r} as {builder}: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None

    return load(cfg.split), load(cfg.validation_split) if cfg.validation_split else None
