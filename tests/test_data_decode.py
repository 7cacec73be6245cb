"""The streaming decode stage: formats, bad input counted by reason, bounded blocks, parallel = sequential."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pytest
import zstandard

from karma.data import decode
from karma.data.decode import DecodeError, FileTask, decode_file, decode_files


def rc(i: int, **over) -> dict:
    c = {"id": f"c{i}", "parent_id": "t3_p1", "link_id": "t3_p1", "subreddit": "College", "author": f"u{i}",
         "body": f"comment {i}", "score": i, "created_utc": 1_600_000_000 + i}  # fmt: skip
    c.update(over)
    return c


def lines_of(records) -> list[bytes]:
    return [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]


def write_zst(path, records, *, window_log: int | None = None, frames: int = 1, block_per_line: bool = False):
    """zstd NDJSON; returns the compressed size before the last line (for cutting into the last block)."""
    lines = lines_of(records)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log) if window_log else None
    cctx = zstandard.ZstdCompressor(compression_params=params) if params else zstandard.ZstdCompressor()
    out = io.BytesIO()
    before_last = 0
    per_frame = -(-len(lines) // frames)
    for f in range(frames):
        chunk = lines[f * per_frame : (f + 1) * per_frame]
        w = cctx.stream_writer(out, closefd=False)
        for i, line in enumerate(chunk):
            if f == frames - 1 and i == len(chunk) - 1:
                w.flush(zstandard.FLUSH_BLOCK)
                before_last = out.tell()
            w.write(line + b"\n")
            if block_per_line:
                w.flush(zstandard.FLUSH_BLOCK)
        w.flush(zstandard.FLUSH_FRAME)
    path.write_bytes(out.getvalue())
    return before_last


def run(path, kind="comments", tmp_path=None, **kw):
    out = (tmp_path or path.parent) / f"{path.name}.arrow"
    return decode_file(FileTask(path=str(path), kind=kind, index=0, out_path=str(out), **kw))


def read_rows(stats) -> pa.Table:
    tables = [pa.ipc.open_file(p).read_all() for p in stats.out_paths]
    return pa.concat_tables(tables) if tables else None


def test_two_gib_window_multi_frame_zstd(tmp_path):
    # a window above zstd's default 128 MiB limit: needs max_window_size (Pushshift dumps use 2 GiB)
    path = tmp_path / "RC_big_window.zst"
    write_zst(path, [rc(i) for i in range(1, 301)], window_log=28, frames=3)
    with pytest.raises(zstandard.ZstdError, match="too much memory"):
        zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    st = run(path)
    assert (st.format, st.status, st.lines_read, st.kept, st.skipped) == ("zstd", "ok", 300, 300, {})
    t = read_rows(st)
    assert t.num_rows == 300
    assert t.column("id").to_pylist() == [f"c{i}" for i in range(1, 301)]
    assert t.column("row_no").to_pylist() == list(range(300))
    import hashlib

    assert st.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_lines_are_counted_by_reason_and_a_truncated_frame_keeps_what_came_before(tmp_path):
    records = [rc(1), rc(2)]
    records += [b'{"id": "c3", "body": ', b"not json at all", b'{"id": "c4", "body": "caf\xe9"}']
    records += [rc(5, score=None) | {"score": None}, {k: v for k, v in rc(6).items() if k != "body"}]
    records += [rc(7, body="[deleted]"), rc(8, author="AutoModerator"), rc(9, distinguished="moderator")]
    records += [rc(10, stickied=True), [1, 2], rc(11), rc(12)]  # rc(12) is cut off by the truncation
    path = tmp_path / "RC_corrupt.zst"
    before_last = write_zst(path, records, block_per_line=True)
    data = path.read_bytes()
    path.write_bytes(data[: (before_last + len(data)) // 2])
    st = run(path)
    assert st.status == "truncated_frame"
    assert st.skipped == {
        "not_json": 3, "not_utf8": 1, "missing_field:score": 1, "missing_field:body": 1, "deleted_body": 1,
        "bot_author": 1, "moderator": 1, "stickied": 1, "truncated_frame": 1,
    }  # fmt: skip
    assert st.lines_read == len(records)  # the lost last line is the one truncated_frame
    assert st.kept == 3  # c1, c2, c11
    assert st.kept + sum(st.skipped.values()) == st.lines_read
    t = read_rows(st)
    usable = [i for i, u in zip(t.column("id").to_pylist(), t.column("usable").to_pylist(), strict=True) if u]
    assert usable == ["c1", "c2", "c11"]
    # nodes that are not examples (deleted, bot, ...) are still there for their replies
    assert set(t.column("id").to_pylist()) >= {"c5", "c6", "c7", "c8", "c9", "c10"}


def test_empty_not_zstd_and_empty_content_files(tmp_path):
    empty = tmp_path / "RC_empty.zst"
    empty.write_bytes(b"")
    fake = tmp_path / "RC_fake.zst"
    fake.write_text(json.dumps(rc(1)) + "\n")
    hollow = tmp_path / "RC_hollow.zst"
    hollow.write_bytes(zstandard.ZstdCompressor().compress(b"\n\n"))
    for path, status in ((empty, "empty_file"), (fake, "not_zstd")):
        st = run(path)
        assert (st.status, st.lines_read, st.kept, st.skipped, st.out_paths) == (status, 0, 0, {}, [])
    st = run(hollow)  # blank lines only: no records, but its lines are counted
    assert (st.status, st.lines_read, st.kept, st.skipped, st.out_paths) == (
        "empty_file",
        2,
        0,
        {"blank_line": 2},
        [],
    )


def test_plain_jsonl_gzip_and_blank_lines(tmp_path):
    body = (
        b"\n".join(lines_of([rc(1), rc(2)])) + b"\n\n   \n" + json.dumps(rc(3)).encode()
    )  # no final newline
    plain = tmp_path / "RC.jsonl"
    plain.write_bytes(body)
    gz = tmp_path / "RC.jsonl.gz"
    gz.write_bytes(gzip.compress(body))
    for path, fmt in ((plain, "text"), (gz, "gzip")):
        st = run(path)
        # issue 20: the two blank lines were not counted anywhere (lines_read was 3)
        assert (st.format, st.lines_read, st.kept, st.skipped) == (fmt, 5, 3, {"blank_line": 2})
        assert st.kept + sum(st.skipped.values()) == st.lines_read
    cut = tmp_path / "RC_cut.jsonl.gz"
    cut.write_bytes(gzip.compress(body * 2000)[:-40])
    st = run(cut)
    assert st.status == "truncated_frame" and st.skipped["truncated_frame"] == 1


def test_lone_surrogate_is_replaced_and_counted_not_fatal(tmp_path):
    """The row is kept (a comment is a node of its thread: its replies need it), its text repaired, and the repair
    counted per row in `cleaned` (issue 20: it was replaced silently)."""
    path = tmp_path / "RC.jsonl"
    path.write_text('{"id": "c1", "parent_id": "t3_p", "link_id": "t3_p", "subreddit": "s", "body": "smile \\ud83d",'
                    ' "score": 1, "created_utc": 5}\n'
                    '{"id": "c2", "parent_id": "t1_c1", "link_id": "t3_p", "subreddit": "s\\udc00x",'
                    ' "body": "two \\ud800 in \\udfff one row", "score": 1, "created_utc": 6}\n'
                    '{"id": "c3", "parent_id": "t1_c2", "link_id": "t3_p", "subreddit": "s", "body": "paired \\ud83d\\ude00",'
                    ' "score": 1, "created_utc": 7}\n')  # fmt: skip
    st = run(path)
    assert (st.lines_read, st.kept, st.skipped, st.cleaned) == (3, 3, {}, {"lone_surrogate": 2})
    assert st.to_card()["cleaned"] == {"lone_surrogate": 2}
    t = read_rows(st)
    assert t.column("body").to_pylist() == [
        "smile \ufffd",
        "two \ufffd in \ufffd one row",
        "paired \U0001f600",
    ]
    assert t.column("subreddit").to_pylist() == [
        "s",
        "s\ufffdx",
        "s",
    ]  # two columns of one row: one row cleaned


def test_a_byte_order_mark_does_not_lose_the_first_record(tmp_path):
    """Issue 20: a UTF-8 BOM before the first record made it `not_json`. Plain, gzip and zstd, a BOM at the start
    of a second zstd frame (two dumps concatenated), and a file that is only a BOM and a newline."""
    bom = b"\xef\xbb\xbf"
    body = b"\n".join(lines_of([rc(1), rc(2), rc(3)])) + b"\n"
    files = {
        "RC_bom.jsonl": bom + body,
        "RC_bom.jsonl.gz": gzip.compress(bom + body),
        "RC_bom.zst": zstandard.ZstdCompressor().compress(bom + body),
        "RC_bom2.zst": zstandard.ZstdCompressor().compress(bom + body)
        + zstandard.ZstdCompressor().compress(bom + b"\n".join(lines_of([rc(4)])) + b"\n"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        st = run(tmp_path / name)
        n = 4 if name == "RC_bom2.zst" else 3
        assert (st.status, st.lines_read, st.kept, st.skipped) == ("ok", n, n, {}), name
        assert read_rows(st).column("id").to_pylist() == [f"c{i}" for i in range(1, n + 1)], name
    only = tmp_path / "RC_only_bom.jsonl"
    only.write_bytes(bom + b"\n")
    st = run(only)
    assert (st.status, st.lines_read, st.kept, st.skipped) == ("empty_file", 1, 0, {"blank_line": 1})
    bad = tmp_path / "RC_bom_bad.jsonl"  # a BOM before something that is not JSON is still not JSON
    bad.write_bytes(bom + b"{broken\n")
    assert run(bad).skipped == {"not_json": 1}


def test_limit_counts_only_the_first_records(tmp_path):
    path = tmp_path / "RC.zst"
    write_zst(path, [rc(i) for i in range(1, 51)])
    st = run(path, limit=7)
    assert (st.lines_read, st.kept) == (7, 7)


def test_batches_bound_memory(tmp_path):
    path = tmp_path / "RC.zst"
    write_zst(path, [rc(i) for i in range(1, 1001)])
    st = run(path, batch_rows=64)
    reader = pa.ipc.open_file(st.out_paths[0])
    assert reader.num_record_batches == 16  # 1000 rows in batches of at most 64
    assert max(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)) == 64


def test_parallel_blocks_equal_sequential(tmp_path, monkeypatch):
    """Block-parallel decode (forced on with tiny blocks) gives the same rows, counts and hashes."""
    records = [rc(i, body="[deleted]") if i % 17 == 0 else rc(i) for i in range(1, 3001)]
    records.insert(1500, b"{broken")
    records.insert(0, b"\xef\xbb\xbf" + json.dumps(rc(0)).encode())  # a BOM before the first record
    cut = b'{"id": "s1", "parent_id": "t3_p1", "link_id": "t3_p1", "subreddit": "College", "body": "cut \\ud83d", '
    records[700:700] = [
        b"",
        b"  ",
        cut + b'"score": 1, "created_utc": 1}',
    ]  # blank lines and a lone surrogate
    comments = tmp_path / "RC.zst"
    write_zst(comments, records)
    posts = tmp_path / "RS.jsonl"
    posts.write_text("".join(json.dumps({"id": f"p{i}", "title": f"t{i}", "selftext": "", "subreddit": "College",
                                         "score": 1, "created_utc": i}) + "\n" for i in range(5)))  # fmt: skip

    def tasks(tag):
        return [
            FileTask(path=str(comments), kind="comments", index=0, out_path=str(tmp_path / f"c-{tag}.arrow")),
            FileTask(path=str(posts), kind="submissions", index=1, out_path=str(tmp_path / f"p-{tag}.arrow"),
                     as_example=False),
            # --limit files go to a worker whole
            FileTask(path=str(comments), kind="comments", index=2, out_path=str(tmp_path / f"l-{tag}.arrow"), limit=10),
        ]  # fmt: skip

    seq = decode_files(tasks("seq"), workers=1)
    monkeypatch.setattr(decode, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(decode, "BLOCK_BYTES", 4096)
    par = decode_files(tasks("par"), workers=2)
    for s, p in zip(seq, par, strict=True):
        assert (p.lines_read, p.kept, p.skipped, p.cleaned, p.sha256, p.status) == (
            s.lines_read,
            s.kept,
            s.skipped,
            s.cleaned,
            s.sha256,
            s.status,
        )
    assert seq[0].skipped == {"deleted_body": 176, "not_json": 1, "blank_line": 2}
    assert seq[0].cleaned == {"lone_surrogate": 1} and seq[0].lines_read == len(records)
    assert (par[2].lines_read, par[2].kept) == (10, 10)
    a = read_rows(seq[0]).sort_by("id").drop_columns(["row_no"])
    b = read_rows(par[0]).sort_by("id").drop_columns(["row_no"])
    assert a.equals(b)
    # row numbers keep the file order across blocks and workers
    t = read_rows(par[0]).sort_by("row_no")
    ids = [r["id"] for r in records if isinstance(r, dict)]
    assert t.column("id").to_pylist() == ["c0", *ids[:699], "s1", *ids[699:]]
    assert len({r >> 32 for r in t.column("row_no").to_pylist()}) > 50  # it really went block by block


DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a": ' * 100_000 + b"1" + b"}" * 100_000


def raw(i: int, field: str, literal: bytes) -> bytes:
    """rc(i) as a JSON line whose `field` is the raw JSON literal (a number no Python value writes as)."""
    return json.dumps(rc(i, **{field: "@@"})).encode().replace(b'"@@"', literal)


def task_of(path, out, **kw) -> FileTask:
    return FileTask(path=str(path), kind="comments", index=0, out_path=str(out), **kw)


def force_parallel(monkeypatch) -> None:
    monkeypatch.setattr(decode, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(decode, "BLOCK_BYTES", 4096)


@pytest.mark.timeout(60)
def test_deep_nesting_and_huge_numbers_are_counted_records_in_and_out_of_workers(tmp_path, monkeypatch):
    records = [rc(1), DEEP_ARRAY, rc(2), DEEP_OBJECT, b"  " + DEEP_ARRAY, rc(3)]  # "  ": the json.loads path
    records += [raw(4, "score", b"123456789012345678901234567890"), raw(5, "score", b"-123456789012345678901234567890"),
                raw(6, "score", b"1e30"), raw(7, "score", b"Infinity"), raw(8, "score", b"-Infinity"),
                raw(9, "created_utc", b"1e400"), raw(10, "created_utc", b"99999999999999999999"),
                raw(11, "score", b"NaN")]  # fmt: skip
    records += [rc(i) for i in range(12, 400)]  # more blocks than the workers hold at once
    path = tmp_path / "RC_bad.zst"
    write_zst(path, records)
    seq = run(path)
    force_parallel(monkeypatch)
    (par,) = decode_files([task_of(path, tmp_path / "p.arrow")], workers=2)
    expected = {"not_json": 3, "out_of_range:score": 5, "out_of_range:created_utc": 2, "bad_field:score": 1}
    for st in (seq, par):
        assert (st.status, st.lines_read, st.kept, st.skipped) == ("ok", len(records), 3 + 388, expected)
        t = read_rows(st).sort_by("row_no")
        ids, usable = t.column("id").to_pylist(), t.column("usable").to_pylist()
        good = ["c1", "c2", "c3"] + [f"c{i}" for i in range(12, 400)]
        assert [i for i, u in zip(ids, usable, strict=True) if u] == good
        # a comment without a usable score is still a node of its thread; one without a time is not
        assert {"c4", "c5", "c6", "c7", "c8", "c11"} <= set(ids) and not {"c9", "c10"} & set(ids)
    assert len(par.out_paths) > 4  # it really went block by block


class _Unpicklable(Exception):
    def __init__(self):
        super().__init__("cannot cross back to the parent")
        self.hook = lambda: None  # a lambda cannot be pickled


class _ExplodingKind(str):
    __slots__ = ()

    def __hash__(self):
        raise _Unpicklable


@dataclass
class WorkerKiller(FileTask):
    """A FileTask that ends the worker process that unpickles it (the parent only pickles it)."""

    how: str = "exit"

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.how == "exit":
            os._exit(1)
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        self.kind = _ExplodingKind(self.kind)  # the worker raises an exception that cannot be pickled


DIED = r"^a decode worker process died \(killed by a signal, out of memory, or exited\) while decoding .*/RC_x\.zst$"


FAILED_UNPICKLABLE = r"^a decode worker failed on .*/RC_x\.zst: \w+: .*pickle"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "kill", "unpicklable"])
def test_a_dead_or_failing_worker_fails_the_run_at_once(tmp_path, monkeypatch, how):
    path = tmp_path / "RC_x.zst"
    write_zst(path, [rc(i) for i in range(1, 2001)])  # ~60 blocks: the feeder must not wait for dead workers
    force_parallel(monkeypatch)
    task = WorkerKiller(path=str(path), kind="comments", index=0, out_path=str(tmp_path / "x.arrow"), how=how)
    with pytest.raises(DecodeError, match=FAILED_UNPICKLABLE if how == "unpicklable" else DIED):
        decode_files([task], workers=2)


@pytest.mark.timeout(60)
def test_a_worker_error_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "RC_y.zst"
    write_zst(path, [rc(i) for i in range(1, 300)])
    force_parallel(monkeypatch)
    task = task_of(path, tmp_path / "no" / "such" / "y.arrow")
    with pytest.raises(DecodeError, match=r"^a decode worker failed on .*/RC_y\.zst: FileNotFoundError: "):
        decode_files([task], workers=2)


CUT_AFTER_150 = ("truncated_frame", 151, 150, {"truncated_frame": 1})  # the lost rest is one line


def ids_of(st) -> list[str]:
    return read_rows(st).sort_by("row_no").column("id").to_pylist()


@pytest.mark.timeout(60)
def test_a_truncated_gzip_keeps_every_record_before_the_cut(tmp_path, monkeypatch):
    lines = lines_of([rc(i) for i in range(1, 301)])
    co = zlib.compressobj(wbits=31)  # gzip
    # the first 150 lines end at a full flush: a cut after it keeps exactly them
    head = co.compress(b"\n".join(lines[:150]) + b"\n") + co.flush(zlib.Z_FULL_FLUSH)
    data = head + co.compress(b"\n".join(lines[150:]) + b"\n") + co.flush()
    cut = tmp_path / "RC_cut.jsonl.gz"
    cut.write_bytes(data[: len(head) + 10])  # 10 bytes into the next deflate block: none of it is readable
    st = run(cut)
    assert (st.status, st.lines_read, st.kept, st.skipped) == CUT_AFTER_150
    assert ids_of(st) == [f"c{i}" for i in range(1, 151)]

    # cut in half: every line zlib can read back is kept (before: none of the 300)
    half = tmp_path / "RC_half.jsonl.gz"
    whole = gzip.compress(b"\n".join(lines) + b"\n", mtime=0)
    half.write_bytes(whole[: len(whole) // 2])
    readable = zlib.decompressobj(wbits=31).decompress(half.read_bytes()).count(b"\n")
    st = run(half)
    assert readable > 100 and (st.lines_read, st.kept) == (readable + 1, readable)
    assert ids_of(st) == [f"c{i}" for i in range(1, readable + 1)]

    # several members and zero padding after the last are one stream; a cut in the second keeps the first
    members = tmp_path / "RC_members.jsonl.gz"
    members.write_bytes(gzip.compress(b"\n".join(lines[:100]) + b"\n") + whole + b"\0" * 64)
    st = run(members)
    assert (st.status, st.lines_read, st.kept) == ("ok", 400, 400)
    members.write_bytes(gzip.compress(b"\n".join(lines[:100]) + b"\n") + whole[: len(whole) // 2])
    st = run(members)
    assert (st.status, st.kept, st.skipped) == ("truncated_frame", 100 + readable, {"truncated_frame": 1})

    # the same counts when the parent decompresses and workers parse
    force_parallel(monkeypatch)
    par = decode_files([task_of(half, tmp_path / "h.arrow")], workers=2)
    assert (par[0].status, par[0].lines_read, par[0].kept) == ("truncated_frame", readable + 1, readable)
    assert ids_of(par[0]) == [f"c{i}" for i in range(1, readable + 1)]


def test_a_truncated_zstd_keeps_every_complete_block(tmp_path):
    """zstd decodes a block only whole (at most 128 KiB of text): a cut loses the block it falls in."""
    out = io.BytesIO()
    w = zstandard.ZstdCompressor().stream_writer(out, closefd=False)
    ends = []
    for b in range(6):
        w.write(b"\n".join(lines_of([rc(i) for i in range(50 * b + 1, 50 * b + 51)])) + b"\n")
        w.flush(zstandard.FLUSH_BLOCK)
        ends.append(out.tell())
    w.flush(zstandard.FLUSH_FRAME)
    path = tmp_path / "RC_cut.zst"
    path.write_bytes(out.getvalue()[: (ends[2] + ends[3]) // 2])  # inside the fourth block
    st = run(path)
    assert (st.status, st.lines_read, st.kept, st.skipped) == CUT_AFTER_150
    assert ids_of(st) == [f"c{i}" for i in range(1, 151)]


def test_the_card_reports_blank_lines_as_skipped_and_repaired_text_as_cleaned(tmp_path):
    from karma.data import prepare

    post = {"id": "p1", "title": "Which college?", "selftext": "", "subreddit": "College", "score": 5,
            "created_utc": 1_600_000_000}  # fmt: skip
    posts = tmp_path / "RS.jsonl"
    posts.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(post).encode() + b"\n"
    )  # BOM: the one post must not be lost
    comments = [rc(1, body="great \ud83d"), rc(2), rc(3)]
    text = b"".join(
        json.dumps(r).encode() + b"\n" for r in comments
    )  # json.dumps writes "\ud83d" as an escape
    (tmp_path / "RC.jsonl").write_bytes(text + b"\n\n")
    card = prepare(comments=[tmp_path / "RC.jsonl"], submissions=[posts], out=tmp_path / "out", workers=1)
    rc_card, rs_card = card["inputs"]
    assert (rs_card["lines_read"], rs_card["kept"], rs_card["skipped"]) == (1, 1, {})
    assert (rc_card["lines_read"], rc_card["kept"], rc_card["skipped"], rc_card["cleaned"]) == (
        5,
        3,
        {"blank_line": 2},
        {"lone_surrogate": 1},
    )
    assert card["skipped"] == {"blank_line": 2} and card["cleaned"] == {"lone_surrogate": 1}
    assert card["kept"] + sum(card["skipped"].values()) == card["lines_read"] == 6
    repaired = "records with repaired text: lone_surrogate 1 (each lone surrogate replaced by U+FFFD)"
    assert card["warnings"] == [f"{tmp_path / 'RC.jsonl'}: {repaired}"]
    md = (tmp_path / "out" / "card.md").read_text()
    assert "- blank_line: 2" in md and "- lone_surrogate: 1 (each lone surrogate replaced by U+FFFD)" in md
