"""Image checks under hostile input: memory bounds, a deterministic pixel cap, resource errors, credentials in URLs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from etl.errors import MediaError
from etl.media import DecodeBudget, check_webp, has_userinfo, sniff_image, without_userinfo
from tests.conftest import ROOT, query
from tests.support import PEAK_RSS_WRAPPER, Reply, peak_rss_mb, record, webp_declaring, write_jsonl


def _posts(urls: list[str]) -> list[dict]:
    return [
        record(post_id=f"p{n}", permalink=f"https://example.com/p/{n}", image_urls=[url]) for n, url in enumerate(urls)
    ]


def _media(dsn: str) -> list[tuple]:
    return query(dsn, "SELECT post_id, status, permanent, last_error, source_url FROM post_media ORDER BY post_id")


# -- 5: memory of image checks ----------------------------------------------------------------------------


def test_webp_structure_check_refuses_what_a_decode_would():
    body = webp_declaring(9000, 9000)
    check_webp(body, 9000, 9000)
    for cut in range(len(body)):
        with pytest.raises(MediaError, match="not a valid image"):
            check_webp(body[:cut], 9000, 9000)
    with pytest.raises(MediaError, match="lossless header"):
        check_webp(body, 9000, 8000)  # the container says one size, the bitstream another


def test_decode_budget_never_holds_more_than_its_total_at_once():
    import threading
    import time

    budget = DecodeBudget(100)
    peak, lock = [0], threading.Lock()

    def work(need: int) -> None:
        with budget.reserve(need):
            with lock:
                peak[0] = max(peak[0], budget.used)
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 30, 30, 250, 10, 70)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] <= 100  # the 250 ran alone, with the whole budget
    assert budget.used == 0


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.fault("tiny WebPs declaring 9000x9000 pixels and large ones checked at once: memory stays within the decode budget")
def test_concurrent_webp_bombs_stay_within_the_memory_budget(run_etl, http_server, db, tmp_path):
    bomb = webp_declaring(9000, 9000)  # 38 bytes; a full decode holds about 1.3 GB
    medium = webp_declaring(2000, 2000)  # decoded in full: about 64 MB each
    urls = []
    for n in range(4):
        http_server.routes[f"/bomb{n}.webp"] = Reply(body=bomb, content_type="image/webp")
        urls.append(http_server.url(f"/bomb{n}.webp"))
    for n in range(12):  # more than one per thread that can decode, so memory kept per thread would show
        http_server.routes[f"/medium{n}.webp"] = Reply(body=medium, content_type="image/webp")
        urls.append(http_server.url(f"/medium{n}.webp"))
    jsonl = write_jsonl(tmp_path / "in.jsonl", _posts(urls))
    wrapper = tmp_path / "peak_rss.py"
    wrapper.write_text(PEAK_RSS_WRAPPER)

    def peak_of_a_run(budget_mb: int) -> float:
        env = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_CONCURRENCY": "16", "ETL_DECODE_MEMORY_MB": str(budget_mb)}
        result = run_etl("run", "--source", "jsonl", "--input", str(jsonl), env=env, wrapper=(str(wrapper),))
        assert result.returncode == 0, result.stderr[-3000:]
        rows = _media(db.dsn)
        assert len(rows) == 16 and all(r[1] == "stored" for r in rows), rows
        return peak_rss_mb(result.stderr)

    # The same run with a 1 MB budget decodes nothing (every WebP is checked by its structure): its peak is
    # the run's own footprint (interpreter, boto3, psycopg2, Pillow, 16 threads; about 160 MB), the baseline.
    baseline = peak_of_a_run(1)
    with db.transaction() as cur:  # the same posts again, as new: every table emptied as the `db` fixture does
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'")
        cur.execute("TRUNCATE " + ", ".join(f'"{t}"' for (t,) in cur.fetchall()) + " RESTART IDENTITY CASCADE")
    peak = peak_of_a_run(100)
    print(f"peak RSS {peak:.0f} MB, {baseline:.0f} MB without decodes")
    # Decodes may add the 100 MB budget (one 2000x2000 decode at a time: about 45 MB measured). Without the
    # budget the four bombs alone would take 5 GB; with memory that freed decodes left resident in each
    # thread's malloc arena, twelve mediums took 200-320 MB over the baseline.
    assert peak - baseline < 100, f"peak RSS {peak:.0f} MB, {baseline:.0f} MB without decodes"
    assert peak < 330, f"peak RSS {peak:.0f} MB"
    sizes = query(db.dsn, "SELECT DISTINCT width, height FROM post_media ORDER BY 1")
    assert sizes == [(2000, 2000), (9000, 9000)]


@pytest.mark.fault("a decode gives its memory back before its reservation: the budget bounds what the process holds")
def test_a_decode_frees_its_memory_before_it_returns_its_reservation(tmp_path):
    """Checked in a subprocess: its resident memory (VmRSS) at the end of each reservation, against the start."""
    (tmp_path / "medium.webp").write_bytes(webp_declaring(2000, 2000))  # a full decode: about 45 MB
    script = textwrap.dedent(
        """
        import json, sys
        from contextlib import contextmanager
        from etl.media import DecodeBudget, sniff_image

        def rss_kb():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

        class Watched(DecodeBudget):
            kept = []

            @contextmanager
            def reserve(self, need):
                with super().reserve(need):
                    before = rss_kb()
                    yield
                    self.kept.append(rss_kb() - before)  # still held as the reservation ends

        budget = Watched(100 * 1024 * 1024)
        body = open(sys.argv[1], "rb").read()
        for _ in range(3):
            assert sniff_image(body, budget) == ("image/webp", 2000, 2000)
        print(json.dumps(budget.kept))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "medium.webp")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    kept_kb = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(kept_kb) == 3 and all(kb < 4096 for kb in kept_kb), f"kB still resident at release: {kept_kb}"


def _one_pixel_png_inflating_to(megabytes: int) -> bytes:
    """A 1x1 greyscale PNG whose one IDAT inflates to `megabytes` MB of zeros (built without compressing them)."""
    import zlib

    mb = 1 << 20
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflate.compress(b"\0" * mb)
    deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(b"\0" * mb) + deflate.flush(zlib.Z_FULL_FLUSH)  # 1 MB of zeros, byte-aligned, no history
    adler = (((megabytes * mb) % 65521) << 16) | 1  # adler32 of that many zero bytes
    stream = b"\x78\xda" + block * megabytes + b"\x03\x00" + adler.to_bytes(4, "big")  # + an empty final block

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(data, zlib.crc32(kind)).to_bytes(4, "big")

    ihdr = (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


@pytest.mark.fault("a 1x1 PNG whose image data inflates to 8 GB (8 MB on the wire): inflated no further than its one row")
def test_a_png_is_not_inflated_past_the_rows_its_header_declares():
    import time

    body = _one_pixel_png_inflating_to(8000)
    assert len(body) < 20 << 20  # under ETL_MAX_IMAGE_BYTES' default
    started = time.monotonic()
    assert sniff_image(body) == ("image/png", 1, 1)  # its one row is there; Pillow ignores the rest too
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"checking a 1x1 PNG of {len(body) >> 20} MB took {elapsed:.1f}s (8 GB inflated)"


# -- 6: the pixel cap decides, the same way every time ------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.fault("40 identical 90-megapixel PNGs checked concurrently: every one stored, every time (no warning races)")
def test_forty_90_megapixel_pngs_are_all_stored(run_etl, http_server, db, tmp_path):
    buf = io.BytesIO()
    Image.new("1", (9500, 9500), 1).save(buf, format="PNG")  # 90.25 Mpx: over Pillow's warning, under our cap
    body = buf.getvalue()
    assert len(body) < 50_000
    http_server.routes.update({f"/big{n}.png": Reply(body=body) for n in range(40)})
    jsonl = write_jsonl(tmp_path / "in.jsonl", _posts([http_server.url(f"/big{n}.png") for n in range(40)]))
    result = run_etl("run", "--source", "jsonl", "--input", str(jsonl), env={"ETL_ALLOW_PRIVATE_HOSTS": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _media(db.dsn)
    assert [r[1] for r in rows] == ["stored"] * 40, [r for r in rows if r[1] != "stored"][:3]


def test_the_pixel_cap_is_ours_at_any_concurrency():
    from concurrent.futures import ThreadPoolExecutor

    buf = io.BytesIO()
    Image.new("1", (9500, 9500), 0).save(buf, format="PNG")
    under = buf.getvalue()
    buf = io.BytesIO()
    Image.new("1", (10_050, 10_000), 0).save(buf, format="PNG")  # 100.5 Mpx: just over our cap
    over = buf.getvalue()

    def verdict(body: bytes) -> str:
        try:
            return sniff_image(body)[0]
        except MediaError as exc:
            return f"refused: {exc}"

    with ThreadPoolExecutor(16) as pool:
        verdicts = list(pool.map(verdict, [under, over] * 16))
    assert verdicts[0::2] == ["image/png"] * 16
    assert verdicts[1::2] == ["refused: image of 10050x10000 pixels is too large"] * 16


# -- 7: out of memory is transient ---------------------------------------------------------------------------


@pytest.mark.fault("MemoryError while checking an image: a transient failure with a clear reason, retried next run")
def test_memory_error_while_checking_is_transient(tmp_path):
    """A real MemoryError: the check runs in a subprocess whose address space leaves no room for the decode."""
    buf = io.BytesIO()
    Image.new("L", (8000, 8000), 7).save(buf, format="GIF")  # 64 Mpx: a one-byte-a-pixel decode of 64 MB
    (tmp_path / "big.gif").write_bytes(buf.getvalue())
    script = textwrap.dedent(
        """
        import json, resource, sys
        import psutil
        from etl.media import sniff_image
        from etl.errors import MediaError
        body = open(sys.argv[1], "rb").read()
        sniff_image(open(sys.argv[2], "rb").read())  # Pillow and its plugins loaded before the limit
        room = psutil.Process().memory_info().vms + 40 * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (room, room))
        try:
            sniff_image(body)
            print(json.dumps({"stored": True}))
        except MediaError as exc:
            print(json.dumps({"message": str(exc), "permanent": exc.permanent}))
        """
    )
    small = io.BytesIO()
    Image.new("L", (8, 8), 7).save(small, format="GIF")
    (tmp_path / "small.gif").write_bytes(small.getvalue())
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big.gif"), str(tmp_path / "small.gif")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"message": "out of memory while checking the 8000x8000 image; left for the next run", "permanent": False}


# -- 19: messages say what the bytes are ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<!-- Generator: an editor -->\n<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", "SVG is not accepted"),
        (b"\xef\xbb\xbf<!-- a comment --><svg/>", "SVG is not accepted"),
        (b"<!-- not svg --><p>hello</p>", "HTML/XML"),
        (b"\x00\x01\x02 some bytes that no format starts with", "not a recognised image format"),
    ],
)
@pytest.mark.badinput("an SVG behind a comment, or bytes of no known format: a message saying what they are, no object reprs")
def test_messages_say_what_the_bytes_are(body, message):
    with pytest.raises(MediaError) as info:
        sniff_image(body)
    assert message in str(info.value)
    assert "object at 0x" not in str(info.value) and "BytesIO" not in str(info.value)
    assert info.value.permanent


# -- 13: credentials in image URLs ---------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.badinput("an image URL with user:password@: refused for good, nothing sent, stored and logged without them")
def test_credentials_in_an_image_url_are_never_sent_stored_or_logged(run_etl, http_server, db, tmp_path):
    http_server.routes["/x.png"] = Reply(body=b"never served")
    secret_url = http_server.url("/x.png").replace("http://", "http://archivist:hunter2-pw@")
    jsonl = write_jsonl(tmp_path / "in.jsonl", _posts([secret_url]))
    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_LOG_FILE": str(tmp_path / "etl.log")}
    for expected in (1, 0):  # the second run does not try it again (a permanent failure)
        result = run_etl("--log-level", "DEBUG", "run", "--source", "jsonl", "--input", str(jsonl), env=env)
        assert result.returncode == expected, result.stderr[-3000:]
    assert http_server.requests == []
    rows = _media(db.dsn)
    assert rows == [("p0", "failed", True, "refused URL with credentials (user-info) in it: nothing was sent", http_server.url("/x.png"))]
    assert query(db.dsn, "SELECT attempts FROM post_media") == [(1,)]
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(1,)]  # the post itself is archived
    logs = result.stdout + result.stderr + (tmp_path / "etl.log").read_text()
    assert "hunter2-pw" not in logs and "archivist" not in logs
    assert http_server.url("/x.png") in logs
    stored = query(db.dsn, "SELECT row_to_json(t)::text FROM (SELECT * FROM post_media) t")
    stored += query(db.dsn, "SELECT row_to_json(t)::text FROM (SELECT * FROM etl_runs) t")
    assert not any("hunter2-pw" in row[0] for row in stored)


@pytest.mark.e2e
@pytest.mark.parametrize("password", ["hunter2#pw", "hunter2?pw", "hunter2/pw"])
@pytest.mark.badinput("an image URL whose password holds an unescaped #, ? or /: refused as credentials, never shown")
def test_a_password_with_a_url_delimiter_in_an_image_url_is_never_stored_or_logged(
    run_etl, http_server, db, tmp_path, password
):
    http_server.routes["/x.png"] = Reply(body=b"never served")
    url = http_server.url("/x.png").replace("http://", f"http://archivist:{password}@")
    jsonl = write_jsonl(tmp_path / "in.jsonl", _posts([url]))
    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_LOG_FILE": str(tmp_path / "etl.log")}
    result = run_etl("--log-level", "DEBUG", "run", "--source", "jsonl", "--input", str(jsonl), env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert http_server.requests == []
    rows = _media(db.dsn)  # refused as credentials (urlsplit took the password for a malformed port)
    assert rows == [("p0", "failed", True, "refused URL with credentials (user-info) in it: nothing was sent", http_server.url("/x.png"))]
    stored = query(db.dsn, "SELECT row_to_json(t)::text FROM (SELECT * FROM post_media) t")
    stored += query(db.dsn, "SELECT row_to_json(t)::text FROM (SELECT * FROM etl_runs) t")
    logs = result.stdout + result.stderr + (tmp_path / "etl.log").read_text()
    assert "hunter2" not in logs and "archivist" not in logs
    assert not any("hunter2" in row[0] for row in stored)


@pytest.mark.parametrize(
    ("url", "shown", "credentials"),
    [
        ("http://a:hunter2#pw@h:81/x.png", "http://h:81/x.png", True),
        ("http://a:hunter2?pw@h/x.png?q=1", "http://h/x.png?q=1", True),
        ("http://a:hunter2/pw@h/x@y.png", "http://h/x@y.png", True),
        ("http://a:p@h/x@y.png", "http://h/x@y.png", True),
        ("https://h/@user/1.png", "https://h/@user/1.png", False),  # an "@" in a valid host's path is its path
        ("http://h:8080/a@b.png?to=c@d", "http://h:8080/a@b.png?to=c@d", False),
        ("http://h", "http://h", False),
    ],
)
def test_user_info_is_found_whatever_its_password_holds(url, shown, credentials):
    assert (without_userinfo(url), has_userinfo(url)) == (shown, credentials)
