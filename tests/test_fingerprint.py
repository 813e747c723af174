"""Fingerprints: the hash on photo-like images (the default threshold), the band index against brute force,
and `etl.py fingerprint` / `etl.py similar` as real subprocesses on real PostgreSQL."""

from __future__ import annotations

import random

import pytest

from etl.config import Settings
from etl.errors import ExitCode
from etl.fingerprint import MAX_DISTANCE, dhash_bytes, distance, to_signed
from tests.conftest import query
from tests.support import Reply, encode, photo_like, png_bytes, record, write_jsonl

DEFAULT = Settings().similar_max_distance


@pytest.fixture(scope="module")
def photos():
    return [photo_like(seed) for seed in range(16)]


def test_default_threshold_matches_resized_recompressed_copies_and_no_unrelated_photo(photos):
    originals = [dhash_bytes(encode(p, quality=90)) for p in photos]
    for photo, h in zip(photos, originals, strict=True):
        for scale, quality in ((2, 75), (3, 60), (5, 50)):
            copy = photo.resize((photo.width // scale, photo.height // scale))
            assert distance(h, dhash_bytes(encode(copy, quality=quality))) <= DEFAULT
        assert distance(h, dhash_bytes(encode(photo, "PNG"))) <= DEFAULT  # another format, same picture
    unrelated = [distance(a, b) for i, a in enumerate(originals) for b in originals[i + 1 :]]
    assert min(unrelated) > DEFAULT, sorted(unrelated)[:5]


def test_what_a_small_crop_costs(photos):
    """Measured, for the README: a 2% crop stays mostly within the threshold, a 10% crop mostly does not."""
    def crop(photo, frac):
        dx, dy = int(photo.width * frac), int(photo.height * frac)
        return photo.crop((dx, dy, photo.width - dx, photo.height - dy))

    d2 = sorted(distance(dhash_bytes(encode(p)), dhash_bytes(encode(crop(p, 0.02)))) for p in photos)
    d10 = sorted(distance(dhash_bytes(encode(p)), dhash_bytes(encode(crop(p, 0.10)))) for p in photos)
    assert d2[len(d2) // 2] <= DEFAULT < d10[len(d10) // 2], (d2, d10)


def test_jpeg_is_hashed_in_draft_mode_and_transparency_counts_as_white(photos):
    from PIL import Image

    big = photos[0].resize((4000, 3000))
    assert distance(dhash_bytes(encode(big, quality=90)), dhash_bytes(encode(photos[0], "PNG"))) <= DEFAULT
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 32, 64))  # left half black, right half transparent
    white_right = Image.new("RGB", (64, 64), (255, 255, 255))
    white_right.paste((0, 0, 0), (0, 0, 32, 64))
    assert dhash_bytes(encode(rgba, "PNG")) == dhash_bytes(encode(white_right, "PNG"))


def _insert_media(db, hashes):
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO social_posts (platform, post_id, created_at) SELECT 'bench', 'p' || n, now()"
            " FROM generate_series(0, %s) n",
            (len(hashes) - 1,),
        )
        cur.execute(
            "INSERT INTO post_media (platform, post_id, position, source_url, status, sha256, phash)"
            " SELECT 'bench', 'p' || (n - 1), 0, 'u', 'stored', md5(n::text), h"
            " FROM unnest(%s::bigint[]) WITH ORDINALITY AS t(h, n)",
            ([to_signed(h) for h in hashes],),
        )


def test_band_index_finds_exactly_what_brute_force_finds_at_every_threshold(db):
    rng = random.Random(14)
    base = [rng.getrandbits(64) for _ in range(40)]
    hashes = list(base)
    for h in base:  # neighbours at every distance 0..10, their flipped bits anywhere
        for d in range(11):
            bits = rng.sample(range(64), d)
            hashes.append(h ^ sum(1 << b for b in bits))
    _insert_media(db, hashes)
    for t in range(MAX_DISTANCE + 1):
        for target in base[:10]:
            got = {r[0] for r in query(db.dsn, "SELECT distance FROM near_duplicate_media(%s, %s)", (to_signed(target), t))}
            found = sorted(r[0] for r in query(db.dsn, "SELECT distance FROM near_duplicate_media(%s, %s)", (to_signed(target), t)))
            expected = sorted(distance(target, h) for h in hashes if distance(target, h) <= t)
            assert found == expected and got <= set(range(t + 1))


def test_near_duplicate_lookup_is_an_index_scan(db):
    _insert_media(db, [random.Random(1).getrandbits(64) for _ in range(2000)])
    with db.transaction() as cur:
        cur.execute("ANALYZE post_media")
        cur.execute("EXPLAIN SELECT * FROM near_duplicate_media(123456789, 5)")
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert "BitmapOr" in plan and "post_media_phash_b7" in plan and "Seq Scan" not in plan, plan


def _archive(run_etl, http_server, tmp_path, photos):
    """Six posts on two platforms: photo 0 three times (same bytes), a resized recompressed copy of it, photo 1."""
    a = encode(photos[0], quality=85)
    http_server.routes["/a.jpg"] = Reply(body=a, content_type="image/jpeg")
    http_server.routes["/a-small.jpg"] = Reply(body=encode(photos[0].resize((400, 300)), quality=60), content_type="image/jpeg")
    http_server.routes["/b.jpg"] = Reply(body=encode(photos[1], quality=85), content_type="image/jpeg")
    http_server.routes["/c.png"] = Reply(body=encode(photos[2], "PNG"), content_type="image/png")
    posts = [
        record(platform="alpha", post_id="orig", author_username="ana", created_at="2024-03-01T10:00:00Z", image_urls=[http_server.url("/a.jpg"), http_server.url("/c.png")]),
        record(platform="alpha", post_id="repost", author_username="ben", created_at="2024-03-02T10:00:00Z", image_urls=[http_server.url("/a.jpg")]),
        record(platform="beta", post_id="x:1", author_username="cy", created_at="2024-03-05T10:00:00Z", image_urls=[http_server.url("/a.jpg")]),
        record(platform="beta", post_id="small", author_username="dee", created_at="2024-02-20T10:00:00Z", image_urls=[http_server.url("/a-small.jpg")]),
        record(platform="beta", post_id="other", author_username="eve", created_at="2024-03-03T10:00:00Z", image_urls=[http_server.url("/b.jpg")]),
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "posts.jsonl", posts)
    result = run_etl("run", "--source", "jsonl", "--input", str(path), env={"ETL_ALLOW_PRIVATE_HOSTS": "true"})
    assert result.returncode == 0, result.stderr


def test_fingerprint_command_hashes_stored_objects_resumes_and_survives_a_missing_object(db, run_etl, http_server, tmp_path, photos):
    _archive(run_etl, http_server, tmp_path, photos)
    first = run_etl("fingerprint")
    assert first.returncode == 0, first.stderr
    assert "6 image(s) hashed, 0 failed" in first.stdout
    rows = query(db.dsn, "SELECT storage_key, phash, phash_algorithm, phash_version FROM post_media ORDER BY id")
    objects = tmp_path / "data" / "objects"
    for key, phash, algorithm, version in rows:
        assert (algorithm, version) == ("dhash", 1)
        assert phash == to_signed(dhash_bytes((objects / key).read_bytes()))
    assert "0 image(s) hashed" in run_etl("fingerprint").stdout  # nothing left: nothing read again

    # Resumable: hashes lost for two rows (an interrupted pass) are the only ones computed again; an object gone
    # from the store is reported by its key, the rest still get theirs, the exit code says partial.
    query_rows = query(db.dsn, "UPDATE post_media SET phash = NULL WHERE post_id IN ('repost', 'other') RETURNING storage_key")
    missing = [k for (k,) in query_rows if "other" in k][0]
    (objects / missing).unlink()
    again = run_etl("fingerprint")
    assert again.returncode == 1
    assert "1 image(s) hashed, 1 failed" in again.stdout and missing in again.stdout
    assert query(db.dsn, "SELECT post_id FROM post_media WHERE phash IS NULL") == [("other",)]


@pytest.mark.fault("an object rots before it is fingerprinted: no hash of the damaged picture, and the repair's is right")
def test_a_damaged_object_is_not_fingerprinted_and_a_repaired_one_is_hashed_again(db, run_etl, http_server, tmp_path):
    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_IMAGE_RETRY_BACKOFF_MINUTES": "0", "ETL_RECHECK_POSTS": "0"}
    original = encode(photo_like(3, (640, 480)), quality=90)
    http_server.routes["/a.jpg"] = Reply(body=original, content_type="image/jpeg")
    posts = write_jsonl(tmp_path / "p.jsonl", [record(post_id="p0", image_urls=[http_server.url("/a.jpg")])])
    assert run_etl("run", "--source", "jsonl", "--input", str(posts), env=env).returncode == 0
    [(key,)] = query(db.dsn, "SELECT storage_key FROM post_media")
    path = tmp_path / "data" / "objects" / key
    # Bit rot inside the entropy-coded data, the size kept: the JPEG still decodes, to another picture.
    damaged = bytearray(original)
    damaged[len(damaged) // 3 : len(damaged) // 3 + 4000] = bytes(4000)
    path.write_bytes(bytes(damaged))
    assert distance(dhash_bytes(bytes(damaged)), dhash_bytes(original)) > MAX_DISTANCE  # it would be another picture
    refused = run_etl("fingerprint", env=env)
    assert refused.returncode == 1 and "do not match the archived sha256" in refused.stdout, refused.stdout
    assert query(db.dsn, "SELECT phash FROM post_media") == [(None,)]

    # A hash taken before the rot (or by an earlier version, which did not check) is dropped by the repair.
    query(db.dsn, "UPDATE post_media SET phash = 12345, phash_algorithm = 'dhash', phash_version = 1 RETURNING id")
    assert run_etl("verify", env=env).returncode == ExitCode.PARTIAL
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert run_etl("run", "--source", "jsonl", "--input", str(empty), env=env).returncode == 0  # refetched
    assert path.read_bytes() == original
    assert query(db.dsn, "SELECT status, phash FROM post_media") == [("stored", None)]
    assert run_etl("fingerprint", env=env).returncode == 0
    assert query(db.dsn, "SELECT phash FROM post_media") == [(to_signed(dhash_bytes(original)),)]


def test_similar_lists_exact_duplicates_first_then_near_duplicates(db, run_etl, http_server, tmp_path, photos):
    _archive(run_etl, http_server, tmp_path, photos)
    assert run_etl("fingerprint").returncode == 0
    result = run_etl("similar", "--post", "alpha:orig")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    image0 = out.split("Image #0")[1].split("Image #1")[0]
    # exact copies (repost, x:1) listed before the near duplicate (small); the unrelated photo not at all
    assert image0.index("repost") < image0.index("small") and image0.index("x:1") < image0.index("small")
    assert " eve " not in out and "beta      other" not in out
    assert "seen in 3 other post(s), 3 account(s), platforms alpha, beta" in image0
    assert "first seen 2024-02-20 10:00, last seen 2024-03-05 10:00" in image0
    assert "seen in 0 other post(s)" in out.split("Image #1")[1]

    import json

    data = json.loads(run_etl("similar", "--post", "alpha:orig", "--json").stdout)
    sightings = data["images"][0]["sightings"]
    assert [s["match"] for s in sightings] == ["exact", "exact", "near"]
    assert sightings[2]["post_id"] == "small" and 0 < sightings[2]["distance"] <= DEFAULT
    # A threshold of 0 keeps the exact copies and drops the near one.
    strict = json.loads(run_etl("similar", "--post", "alpha:orig", "--json", env={"ETL_SIMILAR_MAX_DISTANCE": "0"}).stdout)
    assert [s["post_id"] for s in strict["images"][0]["sightings"]] == ["repost", "x:1"]


@pytest.mark.badinput("similar/trends/report: a malformed --post, an unknown post, a threshold the index cannot serve")
def test_similar_refuses_bad_references_by_name(db, run_etl):
    bad = run_etl("similar", "--post", "no-colon")
    assert bad.returncode == 2 and "PLATFORM:POST_ID" in bad.stderr
    missing = run_etl("similar", "--post", "alpha:nope")
    assert missing.returncode == 2 and "alpha:nope" in missing.stderr and "no such post" in missing.stderr
    high = run_etl("similar", "--post", "alpha:x", env={"ETL_SIMILAR_MAX_DISTANCE": "9"})
    assert high.returncode == 2 and "ETL_SIMILAR_MAX_DISTANCE" in high.stderr


def test_cron_wrapper_runs_the_fingerprint_stage_after_a_run_and_keeps_its_exit_code(tmp_path):
    import os
    import subprocess

    from tests.conftest import ROOT

    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/sh\necho "args: $*"\n[ "$2" = fingerprint ] && exit 0\nexit 1\n')
    fake.chmod(0o755)
    log = tmp_path / "etl.log"
    env = {**os.environ, "ETL_PYTHON": str(fake), "ETL_CRON_LOG": str(log)}
    assert subprocess.run([str(ROOT / "scripts" / "cron_run.sh")], env=env).returncode == 1
    assert "args: etl.py fingerprint" in log.read_text()
    log.unlink()
    subprocess.run([str(ROOT / "scripts" / "cron_run.sh"), "status"], env=env)
    assert "fingerprint" not in log.read_text()  # only after runs and backfills
    # On N hosts, the host of shard 1 only: the pass covers the whole archive.
    for args, hashes in ((["run", "--shard", "2/3"], False), (["run", "--shard=3/3"], False), (["run", "--shard", "1/3"], True),
                         (["run", "--shard=1/3", "--limit", "5"], True), (["backfill", "--source", "mock"], True)):  # fmt: skip
        log.unlink()
        subprocess.run([str(ROOT / "scripts" / "cron_run.sh"), *args], env=env)
        assert ("args: etl.py fingerprint" in log.read_text()) is hashes, (args, log.read_text())


def test_exact_copies_come_before_a_near_duplicate_at_distance_zero(db):
    """Other bytes, the same 64-bit hash: still a near duplicate, listed after the exact copies however old."""
    from etl.similar import find_similar

    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO social_posts (platform, post_id, created_at) VALUES"
            " ('alpha', 'orig', '2024-03-01'), ('alpha', 'copy', '2024-03-02'), ('beta', 'older', '2024-01-01')"
        )
        cur.execute(
            "INSERT INTO post_media (platform, post_id, position, source_url, status, sha256, phash) VALUES"
            " ('alpha', 'orig', 0, 'u', 'stored', 'aaa', 42), ('alpha', 'copy', 0, 'u', 'stored', 'aaa', 42),"
            " ('beta', 'older', 0, 'u', 'stored', 'bbb', 42)"
        )
    sightings = find_similar(db, "alpha", "orig", DEFAULT)["images"][0]["sightings"]
    assert [(s["match"], s["distance"], s["post_id"]) for s in sightings] == [("exact", 0, "copy"), ("near", 0, "older")]


def test_similar_counts_no_account_for_posts_without_an_author(db):
    """A sighting whose author the platform did not give is no account, as in the report (sql/016)."""
    from etl.similar import find_similar

    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO social_posts (platform, post_id, author_username, created_at) VALUES"
            " ('alpha', 'orig', 'ana', '2024-03-01'), ('alpha', 'c1', 'bo', '2024-03-02'),"
            " ('alpha', 'c2', NULL, '2024-03-03'), ('alpha', 'c3', NULL, '2024-03-04')"
        )
        cur.execute(
            "INSERT INTO post_media (platform, post_id, position, source_url, status, sha256, phash)"
            " SELECT platform, post_id, 0, 'u', 'stored', 'aaa', 42 FROM social_posts"
        )
    summary = find_similar(db, "alpha", "orig", DEFAULT)["images"][0]["summary"]
    assert (summary["other_posts"], summary["accounts"]) == (3, 1)


def test_similar_prints_utc_times_whatever_the_servers_zone(new_database, run_etl, http_server, tmp_path):
    # `similar` labels its times UTC but printed them in the session's zone: on a server whose `timezone` is not
    # UTC (initdb takes the OS's), every time was off by the offset.
    import psycopg2

    admin = psycopg2.connect(new_database)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("ALTER DATABASE new_archive_probe SET timezone TO 'Asia/Tokyo'")  # UTC+9
    admin.close()
    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "DATABASE_URL": new_database}
    http_server.routes["/same.png"] = Reply(body=png_bytes(20, 10), content_type="image/png")
    lines = [
        record(post_id="orig", created_at="2024-03-01T12:00:00Z", image_urls=[http_server.url("/same.png")]),
        record(post_id="copy", created_at="2024-03-05T08:30:00Z", image_urls=[http_server.url("/same.png")]),
    ]
    run = run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "p.jsonl", lines)), env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run_etl("similar", "--post", "jsonl:orig", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2024-03-01 12:00 UTC" in out.stdout, out.stdout  # the post
    assert "last seen 2024-03-05 08:30" in out.stdout and "17:30" not in out.stdout, out.stdout  # its sighting


def test_status_tables_print_aware_times_in_utc():
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from etl.status import table

    tokyo = datetime(2024, 3, 1, 21, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert table(["started (UTC)"], [[tokyo]]).splitlines()[-1] == "2024-03-01 12:00"


def test_photo_like_is_the_same_picture_whatever_ran_before():
    """The tests' near-duplicate distances hold only if a seed always gives the same scene, in any test order."""
    from PIL import Image

    first = photo_like(3, (160, 120)).tobytes()
    Image.effect_noise((64, 64), 30)  # moves C's rand(), as other tests' images do in a full run
    assert photo_like(3, (160, 120)).tobytes() == first
