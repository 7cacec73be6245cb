"""Streaming decode stage: one input file → Arrow record batches in an Arrow IPC file, plus counters.

Per file, in bounded memory: the compressed bytes are read in chunks (and hashed on the way), decompressed
with a zstd window of up to 2 GiB (``max_window_size=2**31``, what the big Pushshift / Arctic Shift dumps
need), split into lines, parsed with ``json.loads`` and turned into rows by the pure per-record functions of
:mod:`karma.data.records`. Rows are flushed as an Arrow record batch every ``batch_rows`` rows, so memory
does not grow with the file. With several workers, a process pool parses blocks of lines (see
:func:`decode_files`).

Bad input never stops the run: each problem is counted by reason —

* per line: ``blank_line`` (empty or only whitespace: not a record, but a line of the file),
  ``not_utf8``, ``not_json`` (also JSON nested deeper than the parser goes), ``missing_field:<name>``,
  ``bad_field:<name>``, ``out_of_range:<name>`` (an integer its int64 column cannot hold), the filters
  (``deleted_body``, ``bot_author``, ``moderator``, ``stickied``, ``empty_body``), and ``truncated_frame`` for
  the unreadable rest of a zstd or gzip stream that is cut short or corrupt (counted once, as one line; every
  complete line decompressed before it is kept);
* per file: ``empty_file`` (no records at all) and ``not_zstd`` (a ``.zst`` file that is not zstd).

A decode worker process that fails or dies stops the run at once with :class:`DecodeError`.

Invariant per file: ``kept + sum(skipped.values()) == lines_read``, where ``lines_read`` is every line of the
decompressed text (a last line without its newline included, as ``wc -l`` would miss it).

Repaired, not dropped, and counted in ``cleaned`` (beside ``skipped`` in the card): ``lone_surrogate`` — rows
whose text held a lone UTF-16 surrogate (JSON ``"\ud83d"`` without its pair, usually an emoji cut in half),
which UTF-8 (hence Arrow) cannot hold; each one becomes U+FFFD. The row is kept because it is a node of its
thread: dropping a comment for one broken character would cut its replies off from their post.

A UTF-8 byte order mark at the start of a line — the start of a file or of its decompressed stream, or a
file concatenated after another — is not part of the record and is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from karma.data.records import (
    COMMENT_COLUMNS,
    POST_COLUMNS,
    SHP_COLUMNS,
    SHP_SPLIT_NAMES,
    Filters,
    comment_record,
    post_record,
    shp_record,
)

log = logging.getLogger(__name__)

Kind = Literal["comments", "submissions", "shp"]
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
READ_SIZE = 1 << 20
DEFAULT_BATCH_ROWS = 65536


@dataclass
class FileTask:
    """One input file for the decode stage (picklable: it crosses to worker processes)."""

    path: str
    kind: Kind
    index: int
    out_path: str  # Arrow IPC file written by the worker
    filters: Filters = field(default_factory=Filters)
    as_example: bool = True  # submissions: usable as examples (submissions-only mode)
    limit: int | None = None  # stop after this many records (lines) from this file
    batch_rows: int = DEFAULT_BATCH_ROWS


@dataclass
class FileStats:
    path: str
    kind: str
    index: int
    format: str = "unknown"
    bytes: int = 0
    sha256: str = ""
    lines_read: int = 0
    kept: int = 0
    nodes: int = 0  # rows written (usable + context-only)
    skipped: dict[str, int] = field(default_factory=dict)
    cleaned: dict[str, int] = field(default_factory=dict)  # rows written with repaired text, by repair
    status: str = "ok"  # ok | empty_file | not_zstd | truncated_frame
    error: str | None = None
    seconds: float = 0.0
    out_paths: list[str] = field(default_factory=list)  # Arrow IPC files holding this file's rows

    @property
    def records(self) -> int:
        """Lines that are not blank (a file without any is an ``empty_file``)."""
        return self.lines_read - self.skipped.get("blank_line", 0)

    def to_card(self) -> dict:
        return {
            "path": self.path,
            "kind": self.kind,
            "format": self.format,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "lines_read": self.lines_read,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "cleaned": dict(sorted(self.cleaned.items())),
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }


class TruncatedStream(Exception):
    """The zstd stream ended inside a frame, or a frame is corrupt."""


class _HashingReader:
    """Reads a binary file in chunks and feeds every byte read to sha256."""

    def __init__(self, fh, digest):
        self.fh = fh
        self.digest = digest

    def read(self, n: int = READ_SIZE) -> bytes:
        data = self.fh.read(n)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Hash the rest of the file (after an error stopped decoding early)."""
        while self.read(1 << 22):
            pass


def sniff_format(path: Path) -> str:
    """'empty' | 'zstd' | 'gzip' | 'parquet' | 'not_zstd' (a .zst name without the zstd magic) | 'text'."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        return "empty"
    if head == ZSTD_MAGIC:
        return "zstd"
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head == b"PAR1":
        return "parquet"
    if path.suffix.lower() in (".zst", ".zstd"):
        return "not_zstd"
    return "text"


def _zstd_chunks(reader: _HashingReader) -> Iterator[bytes]:
    """Decompressed chunks of a (possibly multi-frame) zstd stream; TruncatedStream if it ends mid-frame."""
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
    dobj = dctx.decompressobj()
    in_frame = False
    while True:
        data = reader.read(READ_SIZE)
        if not data:
            break
        while data:
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as exc:
                raise TruncatedStream(str(exc)) from exc
            in_frame = not dobj.eof
            if out:
                yield out
            data = b""
            if dobj.eof:  # a frame ended: the next one (if any) needs a fresh decompressor
                data = dobj.unused_data
                dobj = dctx.decompressobj()
    if in_frame:
        raise TruncatedStream("zstd stream ends inside a frame (truncated file)")


_BAD_UTF8 = object()  # marker yielded for a line that is not valid UTF-8


def _lines(chunks: Iterator[bytes]) -> Iterator:
    """Split a byte-chunk stream into str lines (``_BAD_UTF8`` for a line that is not UTF-8).

    Each chunk is cut at its last newline and decoded in one call (a multi-byte character never straddles
    a newline); only a chunk that fails to decode is decoded line by line.
    """
    tail = b""
    for chunk in chunks:
        if tail:
            chunk = tail + chunk
        cut = chunk.rfind(b"\n") + 1
        tail = chunk[cut:]
        if cut:
            yield from _decode_block(chunk[:cut])
    if tail:
        yield from _decode_block(tail)


def _decode_block(block: bytes) -> list:
    """The lines of a block (the empty string after its final newline is not a line)."""
    try:
        out = block.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        out = []
        for raw in block.split(b"\n"):
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(_BAD_UTF8)
    if block.endswith(b"\n"):
        out.pop()
    return out


def _parquet_rows(path: Path, reader: _HashingReader) -> Iterator[dict]:
    """Rows of a parquet file as dicts (SHP is also published as parquet); the file is hashed separately."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        yield from batch.to_pylist()


def _plain_chunks(reader: _HashingReader) -> Iterator[bytes]:
    while data := reader.read(READ_SIZE):
        yield data


def _gzip_chunks(reader: _HashingReader) -> Iterator[bytes]:
    """Decompressed chunks of a (possibly multi-member) gzip stream, as they come: all that was readable is
    yielded before TruncatedStream says the stream ends inside a member or is corrupt."""
    dobj = None  # None between members
    while data := reader.read(READ_SIZE):
        while data:
            if dobj is None:
                data = data.lstrip(b"\0")  # gzip allows zero padding after a member
                if not data:
                    break
                dobj = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
            try:
                out = dobj.decompress(data)
            except zlib.error as exc:
                raise TruncatedStream(f"corrupt gzip stream: {exc}") from exc
            if out:
                yield out
            data = b""
            if dobj.eof:  # a member ended: the next one (if any) needs a fresh decompressor
                data, dobj = dobj.unused_data, None
    if dobj is not None:
        raise TruncatedStream("gzip stream ends inside a member (truncated file)")


class _BatchWriter:
    """Turns lists of row tuples into Arrow record batches appended to one Arrow IPC file.

    Arrow IPC, not parquet, for the temporary files: writing it is a copy (parquet encoding cost 4x more
    than the rest of the write path), and DuckDB scans it through a pyarrow dataset batch by batch.
    """

    def __init__(self, out_path: str, columns: tuple[tuple[str, str], ...], file_idx: int):
        import pyarrow as pa

        self.pa = pa
        self.out_path = out_path
        self.schema = pa.schema(
            [(n, getattr(pa, t)()) for n, t in columns] + [("file_idx", pa.int32()), ("row_no", pa.int64())]
        )
        self.file_idx = file_idx
        self.writer = None
        self.written = 0
        self.cleaned = 0  # rows with a lone surrogate replaced

    def _array(self, values, typ, cleaned: set[int]):
        pa = self.pa
        try:
            return pa.array(values, type=typ)
        except (UnicodeEncodeError, pa.ArrowException):
            # lone surrogates (JSON "\\ud83d" without its pair) cannot be UTF-8: replace them, noting the rows
            out = []
            for i, v in enumerate(values):
                c = _clean(v)
                if c is not v:
                    cleaned.add(i)
                out.append(c)
            return pa.array(out, type=typ)

    def write(self, rows: list[tuple], row_base: int | None = None) -> None:
        """Append rows; their row_no is row_base + position (default: continue this file's count)."""
        if not rows:
            return
        pa = self.pa
        n = len(rows)
        start = self.written if row_base is None else row_base
        cleaned: set[int] = set()
        arrays = [
            self._array(col, f.type, cleaned)
            for col, f in zip(zip(*rows, strict=True), self.schema, strict=False)
        ]
        self.cleaned += len(cleaned)
        arrays.append(pa.nulls(n, pa.int32()).fill_null(self.file_idx))
        arrays.append(pa.array(range(start, start + n), type=pa.int64()))
        if self.writer is None:
            self.writer = pa.ipc.new_file(self.out_path, self.schema)
        self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self.written += n

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _clean(value):
    """`value` itself when UTF-8 can hold it, else a copy with each lone surrogate replaced by U+FFFD."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def decode_file(task: FileTask) -> FileStats:
    """Decode one file into task.out_path; return its counters. Never raises on bad content."""
    import time

    t0 = time.perf_counter()
    path = Path(task.path)
    stats = FileStats(path=str(path), kind=task.kind, index=task.index, bytes=path.stat().st_size)
    fmt = sniff_format(path)
    stats.format = fmt
    digest = hashlib.sha256()
    skipped: Counter[str] = Counter()
    columns = {"comments": COMMENT_COLUMNS, "submissions": POST_COLUMNS, "shp": SHP_COLUMNS}[task.kind]
    writer = _BatchWriter(task.out_path, columns, task.index)
    with open(path, "rb") as fh:
        reader = _HashingReader(fh, digest)
        if fmt in ("empty", "not_zstd"):
            stats.status = "empty_file" if fmt == "empty" else "not_zstd"
            stats.error = (
                "file is empty" if fmt == "empty" else "file name says zstd but it has no zstd frame header"
            )
        else:
            if fmt == "parquet":
                items = _parquet_rows(path, reader)
            else:
                items = _lines(
                    {"zstd": _zstd_chunks, "gzip": _gzip_chunks, "text": _plain_chunks}[fmt](reader)
                )
            try:
                _parse_lines(items, task, writer, stats, skipped)
            except TruncatedStream as exc:
                stats.status, stats.error = "truncated_frame", str(exc)
            except OSError as exc:  # a read error: the rest is unreadable
                stats.status, stats.error = "truncated_frame", f"{type(exc).__name__}: {exc}"
            if stats.status == "truncated_frame":  # the unreadable rest counts as one skipped line
                skipped["truncated_frame"] += 1
                stats.lines_read += 1
            if stats.lines_read == skipped["blank_line"] and stats.status == "ok":
                stats.status = "empty_file"
                stats.error = "no records in file"
        reader.drain()
    writer.close()
    stats.sha256 = digest.hexdigest()
    stats.skipped = dict(skipped)
    stats.cleaned = {"lone_surrogate": writer.cleaned} if writer.cleaned else {}
    stats.kept = stats.lines_read - sum(skipped.values())
    stats.nodes = writer.written
    stats.out_paths = [task.out_path] if writer.written else []
    stats.seconds = time.perf_counter() - t0
    return stats


def _parse_lines(
    lines: Iterator,
    task: FileTask,
    writer: _BatchWriter,
    stats: FileStats,
    skipped: Counter,
    row_base: int | None = None,
) -> None:
    """The hot loop: parse each line and hand the object to the kind's per-record function.

    Adds to stats.lines_read and skipped; rows go to writer numbered from row_base (None: the file's count).
    """
    scan_once = json.JSONDecoder().scan_once  # json.loads minus its per-call type and encoding checks
    limit = task.limit if task.limit is not None else -1
    batch_rows = task.batch_rows
    filters = task.filters
    kind = task.kind
    record = {"comments": comment_record, "submissions": post_record, "shp": shp_record}[kind]
    if kind == "submissions":
        extra: tuple = (filters, task.as_example)
    elif kind == "shp":  # SHP's own files are named train / validation / test
        extra = (SHP_SPLIT_NAMES.get(Path(task.path).name.split(".")[0].lower()),)
    else:
        extra = (filters,)
    many = kind == "shp"  # one SHP row gives two comment rows
    rows: list[tuple] = []
    n = stats.lines_read
    try:
        for line in lines:
            if line is _BAD_UTF8:
                if n == limit:
                    break
                n += 1
                skipped["not_utf8"] += 1
                continue
            if line.__class__ is dict:  # parquet rows arrive parsed
                if n == limit:
                    break
                n += 1
                obj = line
            elif n == limit:
                break
            elif not line or line.isspace():
                n += 1
                skipped["blank_line"] += 1
                continue
            else:
                n += 1
                try:
                    obj, end = scan_once(line, 0)
                    if end != len(line) and not line[end:].isspace():
                        raise ValueError("extra data")
                except StopIteration:  # leading whitespace, a byte order mark, or not JSON at all
                    if line[0] == "\ufeff":
                        line = line[1:]
                        if not line or line.isspace():
                            skipped["blank_line"] += 1
                            continue
                    try:
                        obj = json.loads(line)
                    except (ValueError, RecursionError):
                        skipped["not_json"] += 1
                        continue
                except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
                    skipped["not_json"] += 1
                    continue
            row, reason = record(obj, *extra)
            if row is not None:
                if many:
                    rows.extend(row)
                else:
                    rows.append(row)
            if reason is not None:
                skipped[reason] += 1
            if len(rows) >= batch_rows:
                writer.write(rows, row_base)
                if row_base is not None:
                    row_base += len(rows)
                rows = []
    finally:  # also on a truncated stream: what was read before it is kept
        writer.write(rows, row_base)
        stats.lines_read = n


BLOCK_BYTES = 8 << 20  # decompressed bytes per block handed to a parse worker
PARALLEL_MIN_BYTES = 8 << 20  # smaller inputs (compressed size) are decoded in this process


class DecodeError(RuntimeError):
    """A decode worker process died or failed: the run stops at once, naming the file it was decoding."""


def decode_files(tasks: list[FileTask], workers: int = 1) -> list[FileStats]:
    """Decode every file. workers <= 1: one after the other, in this process.

    workers > 1 (and at least PARALLEL_MIN_BYTES of input): this process reads, hashes and decompresses
    each file and cuts the text into blocks of whole lines (BLOCK_BYTES); a pool of ``workers`` processes
    parses the blocks, each block into its own Arrow file. Row numbers are (block index << 32) + position,
    so "first seen" keeps its meaning. Files read with --limit, and parquet files, go to a worker whole.
    Memory stays bounded: at most 2 blocks per worker are in flight. A worker that raises, or dies (killed
    by a signal, out of memory), raises DecodeError at once.
    """
    total = sum(os.path.getsize(t.path) for t in tasks)
    if workers <= 1 or total < PARALLEL_MIN_BYTES:  # starting workers costs more than it saves
        return [decode_file(t) for t in tasks]
    pool = _Pool(workers)
    whole: dict[int, FileStats] = {}  # decoded whole by decode_file in a worker: complete as they come
    fed: dict[int, FileStats] = {}  # fed block by block: the blocks' counts are added as they come

    def keep(st: FileStats) -> None:
        whole[st.index] = st

    try:
        for task in tasks:
            fmt = sniff_format(Path(task.path))
            if task.limit is not None or fmt not in ("zstd", "gzip", "text"):
                pool.submit(task, keep, decode_file, task)
            else:
                fed[task.index] = _feed_blocks(task, fmt, pool)
        pool.drain()
    finally:
        pool.close()
    for st in fed.values():
        if st.records == 0 and st.status == "ok":
            st.status, st.error = "empty_file", "no records in file"
        st.out_paths.sort()
        st.kept = st.lines_read - sum(st.skipped.values())
    return [whole.get(t.index) or fed[t.index] for t in tasks]


class _Pool:
    """A ProcessPoolExecutor with at most 2 calls per worker in flight; a failed or dead worker → DecodeError."""

    def __init__(self, workers: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("forkserver")
        # the workers fork from a server that has already imported these (pyarrow imports pandas: ~1 s)
        ctx.set_forkserver_preload(["pyarrow", "pandas", "zstandard", "karma.data.decode"])
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        self.max_in_flight = 2 * workers
        self.in_flight: dict = {}  # future -> (task, what to do with its result)

    def submit(self, task: FileTask, on_result, fn, *args) -> None:
        while len(self.in_flight) >= self.max_in_flight:
            self._collect()
        self.in_flight[self.executor.submit(fn, *args)] = (task, on_result)

    def drain(self) -> None:
        while self.in_flight:
            self._collect()

    def _collect(self) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait(self.in_flight, return_when=FIRST_COMPLETED)
        for fut in done:
            task, on_result = self.in_flight[fut]
            try:
                result = fut.result()
            except BrokenProcessPool as exc:
                files = sorted({t.path for t, _ in self.in_flight.values()})
                raise DecodeError(
                    f"a decode worker process died (killed by a signal, out of memory, or exited) while decoding "
                    f"{', '.join(files)}"
                ) from exc
            except Exception as exc:
                raise DecodeError(
                    f"a decode worker failed on {task.path}: {type(exc).__name__}: {exc}"
                ) from exc
            del self.in_flight[fut]
            on_result(result)

    def close(self) -> None:
        """Cancel what has not started; on a failure, wait only for the blocks being parsed (a dead pool: none)."""
        self.executor.shutdown(wait=True, cancel_futures=True)


def _feed_blocks(task: FileTask, fmt: str, pool: _Pool) -> FileStats:
    """Read, hash and decompress one file; hand its text to the pool as blocks of whole lines."""
    import time

    t0 = time.perf_counter()
    path = Path(task.path)
    stats = FileStats(path=str(path), kind=task.kind, index=task.index, bytes=path.stat().st_size, format=fmt)

    def add(result: tuple[int, dict[str, int], int, str | None, int]) -> None:
        lines, skipped, nodes, out_path, cleaned = result
        stats.lines_read += lines
        for k, v in skipped.items():
            stats.skipped[k] = stats.skipped.get(k, 0) + v
        if cleaned:
            stats.cleaned["lone_surrogate"] = stats.cleaned.get("lone_surrogate", 0) + cleaned
        stats.nodes += nodes
        if out_path:
            stats.out_paths.append(out_path)

    def put(block_idx: int, data: bytes) -> None:
        pool.submit(task, add, _parse_block, task, block_idx, data)

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        reader = _HashingReader(fh, digest)
        chunks = {"zstd": _zstd_chunks, "gzip": _gzip_chunks, "text": _plain_chunks}[fmt](reader)
        buf = b""
        block_idx = 0
        try:
            for chunk in chunks:
                buf = buf + chunk if buf else chunk
                while len(buf) >= BLOCK_BYTES:  # cut whole lines of about BLOCK_BYTES
                    cut = buf.rfind(b"\n", 0, BLOCK_BYTES) + 1 or buf.find(b"\n", BLOCK_BYTES) + 1
                    if not cut:  # one line longer than a block: wait for its end
                        break
                    put(block_idx, buf[:cut])
                    block_idx += 1
                    buf = buf[cut:]
            if buf:
                put(block_idx, buf)
        except TruncatedStream as exc:
            stats.status, stats.error = "truncated_frame", str(exc)
        except OSError as exc:  # a read error: the rest is unreadable
            stats.status, stats.error = "truncated_frame", f"{type(exc).__name__}: {exc}"
        if stats.status == "truncated_frame":
            if buf:  # the complete lines before the break are still records
                cut = buf.rfind(b"\n") + 1
                if cut:
                    put(block_idx, buf[:cut])
            stats.skipped["truncated_frame"] = 1
            stats.lines_read += 1
        reader.drain()
    stats.sha256 = digest.hexdigest()
    stats.seconds = time.perf_counter() - t0
    return stats


def _parse_block(
    task: FileTask, block_idx: int, data: bytes
) -> tuple[int, dict[str, int], int, str | None, int]:
    """Pool worker: one block of whole lines → its own Arrow file. (lines, skipped, rows, Arrow path or None,
    rows cleaned)."""
    columns = {"comments": COMMENT_COLUMNS, "submissions": POST_COLUMNS, "shp": SHP_COLUMNS}[task.kind]
    writer = _BatchWriter(f"{task.out_path}.b{block_idx:06d}", columns, task.index)
    stats = FileStats(path=task.path, kind=task.kind, index=task.index)
    skipped: Counter[str] = Counter()
    try:
        _parse_lines(iter(_decode_block(data)), task, writer, stats, skipped, row_base=block_idx << 32)
    finally:
        writer.close()
    out_path = writer.out_path if writer.written else None
    return stats.lines_read, dict(skipped), writer.written, out_path, writer.cleaned
