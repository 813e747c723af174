"""Fixity checks, deletions, language and engagement history (issue 18), end to end through etl.py on a real
PostgreSQL, the local store and moto's S3 server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from etl.db import Ledger
from etl.db.ledger import release_locks
from etl.errors import ExitCode
from tests.conftest import query
from tests.support import Reply, jpeg_bytes, png_bytes, record, write_jsonl

IMAGES = {
    "/a.png": png_bytes(20, 10, (255, 0, 0)),
    "/b.jpg": jpeg_bytes(30, 20),
    "/c.png": png_bytes(9, 9, (0, 0, 255)),
    "/d.png": png_bytes(5, 7, (0, 200, 0)),
}


def serve_images(http_server) -> None:
    for path, body in IMAGES.items():
        http_server.routes[path] = Reply(body=body, content_type="image/jpeg" if path.endswith(".jpg") else "image/png")


def four_posts(http_server, tmp_path: Path, **extra) -> Path:
    return write_jsonl(
        tmp_path / "posts.jsonl",
        [
            record(post_id=f"p{i}", caption="What a lovely sunny day at the beach", image_urls=[http_server.url(path)], **extra)
            for i, path in enumerate(IMAGES)
        ],
    )


def keys_by_post(dsn: str) -> dict[str, str]:
    return dict(query(dsn, "SELECT post_id, storage_key FROM post_media ORDER BY post_id"))


BASE_ENV = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_IMAGE_RETRY_BACKOFF_MINUTES": "0"}


def _run_settings(db, make_settings, **extra: str):
    """The settings of an in-process run of these tests (_run_jsonl): this database, local image hosts, no re-check."""
    return make_settings(DATABASE_URL=db.dsn, ETL_ALLOW_PRIVATE_HOSTS="true", ETL_RECHECK_POSTS="0", **extra)


# -- fixity -----------------------------------------------------------------------------------------


@pytest.mark.fault("objects deleted, truncated or altered behind the archive's back are found by verify and refetched")
def test_verify_on_the_local_store_finds_damage_and_the_next_run_repairs_it(db, run_etl, http_server, tmp_path):
    serve_images(http_server)
    posts = four_posts(http_server, tmp_path)
    metrics = tmp_path / "metrics" / "archiver.prom"
    env = {**BASE_ENV, "ETL_METRICS_PATH": str(metrics)}
    assert run_etl("run", "--source", "jsonl", "--input", str(posts), env=env).returncode == 0
    first = run_etl("verify", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "checked 4, ok 4, missing 0, changed 0" in first.stdout

    root = tmp_path / "data" / "objects"
    keys = keys_by_post(db.dsn)
    (root / keys["p0"]).unlink()  # deleted
    (root / keys["p1"]).write_bytes(IMAGES["/b.jpg"][:100])  # truncated
    altered = bytearray(IMAGES["/c.png"])
    altered[-20] ^= 0xFF
    (root / keys["p2"]).write_bytes(bytes(altered))  # same size, other bytes
    stray = root / "jsonl" / "2024" / "03" / "01" / "ghost" / "0.png"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(IMAGES["/a.png"])  # an object no row knows
    (root / "export").mkdir()
    (root / "export" / "posts.parquet").write_bytes(b"not ours to judge")
    http_server.routes["/c.png"] = Reply(status=404, body=b"gone", content_type="text/plain")  # no longer served

    second = run_etl("verify", env=env)
    out = second.stdout + second.stderr
    assert second.returncode == ExitCode.PARTIAL, out
    assert "checked 4, ok 1, missing 1, changed 2" in out and "unexpected objects 1" in out
    assert "jsonl/2024/03/01/ghost/0.png" in out and "export/" not in second.stdout
    fixity = dict(query(db.dsn, "SELECT post_id, status || ':' || COALESCE(fixity, '-') FROM post_media"))
    assert fixity == {"p0": "failed:missing", "p1": "failed:changed", "p2": "failed:changed", "p3": "stored:ok"}
    ledger = query(db.dsn, "SELECT status, per_source -> 'verify', images_failed FROM etl_runs WHERE mode = 'verify' ORDER BY id")
    assert [row[0] for row in ledger] == ["ok", "partial"]
    counts = ledger[1][1]
    assert (counts["checked"], counts["missing"], counts["changed"], counts["unexpected"]) == (4, 1, 2, 1)
    prom = (metrics.parent / "archiver_verify.prom").read_text()
    assert 'social_archiver_verify_last_objects{result="changed"} 2' in prom
    assert 'social_archiver_verify_last_status{status="partial"} 1' in prom

    status = run_etl("status")
    assert "Last fixity check" in status.stdout and "missing 1, changed 2" in status.stdout

    # The next run (which does not see these posts again) refetches them through the failed-image retries.
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    repair = run_etl("run", "--source", "jsonl", "--input", str(empty), env=env)
    assert "retried from earlier runs" in repair.stdout, repair.stdout + repair.stderr
    assert (root / keys["p0"]).read_bytes() == IMAGES["/a.png"]
    assert (root / keys["p1"]).read_bytes() == IMAGES["/b.jpg"]
    assert (root / keys["p2"]).read_bytes() == bytes(altered)  # the platform no longer serves it: left as found
    rows = dict(query(db.dsn, "SELECT post_id, status || ':' || permanent::text FROM post_media"))
    assert rows == {"p0": "stored:false", "p1": "stored:false", "p2": "failed:true", "p3": "stored:false"}
    third = run_etl("verify", "--platform", "jsonl", env=env)
    assert "checked 3, ok 3, missing 0, changed 0" in third.stdout, third.stdout + third.stderr
    # The failed repair of p2 kept what the row knew of the damaged object: where it is, what it should hash to.
    # (It wrote NULLs over them: every later full verify then listed the object as unexpected, for ever.)
    assert query(db.dsn, "SELECT storage_key, sha256 FROM post_media WHERE post_id = 'p2'") == [
        (keys["p2"], hashlib.sha256(IMAGES["/c.png"]).hexdigest())
    ]
    whole = run_etl("verify", env=env)
    assert "unexpected objects 1" in whole.stdout and keys["p2"] not in whole.stdout, whole.stdout  # the ghost only


@pytest.fixture
def moto_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        **BASE_ENV,
        "S3_BUCKET": "trust",
        "S3_PREFIX": "arch",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }


@pytest.mark.fault("S3 objects deleted, truncated or altered (metadata kept) are found by verify and overwritten")
def test_verify_on_s3_and_the_repair_overwrites_an_object_whose_metadata_lies(db, run_etl, http_server, moto_endpoint, tmp_path):
    env = s3_env(moto_endpoint)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="trust")
    serve_images(http_server)
    posts = four_posts(http_server, tmp_path)
    assert run_etl("run", "--source", "jsonl", "--input", str(posts), env=env).returncode == 0
    keys = keys_by_post(db.dsn)
    assert all(k.startswith("arch/jsonl/2024/03/01/") for k in keys.values())

    s3.delete_object(Bucket="trust", Key=keys["p0"])
    sha_b = hashlib.sha256(IMAGES["/b.jpg"]).hexdigest()
    s3.put_object(Bucket="trust", Key=keys["p1"], Body=IMAGES["/b.jpg"][:50], Metadata={"sha256": sha_b})
    altered = bytearray(IMAGES["/c.png"])
    altered[-20] ^= 0xFF
    sha_c = hashlib.sha256(IMAGES["/c.png"]).hexdigest()
    s3.put_object(Bucket="trust", Key=keys["p2"], Body=bytes(altered), Metadata={"sha256": sha_c})  # lies
    s3.put_object(Bucket="trust", Key="arch/jsonl/2024/03/02/stray/0.png", Body=b"x")
    s3.put_object(Bucket="trust", Key="arch/export/posts/platform=jsonl/dt=2024-03-01/part.parquet", Body=b"x")

    checked = run_etl("verify", env=env)
    out = checked.stdout + checked.stderr
    assert checked.returncode == ExitCode.PARTIAL, out
    assert "checked 4, ok 1, missing 1, changed 2" in out and "unexpected objects 1" in out

    repair = run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "e.jsonl", [])), env=env)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    for post_id, path in (("p0", "/a.png"), ("p1", "/b.jpg"), ("p2", "/c.png")):
        assert s3.get_object(Bucket="trust", Key=keys[post_id])["Body"].read() == IMAGES[path], post_id
    again = run_etl("verify", env=env)
    assert "checked 4, ok 4, missing 0, changed 0" in again.stdout and "unexpected objects 1" in again.stdout


@pytest.mark.fault("a damaged object is repaired under another extension (the platform now serves PNG): the old object goes")
def test_a_repair_under_a_new_extension_deletes_the_damaged_object(db, run_etl, http_server, tmp_path):
    # The repair stored .../0.png and left the damaged .../0.jpg, known to no row: every later full verify listed
    # it as unexpected and exited 1, for ever.
    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_IMAGE_RETRY_BACKOFF_MINUTES": "0"}
    http_server.routes["/img"] = Reply(body=jpeg_bytes(30, 20), content_type="image/jpeg")
    posts = write_jsonl(tmp_path / "p.jsonl", [record(post_id="p0", image_urls=[http_server.url("/img")])])
    assert run_etl("run", "--source", "jsonl", "--input", str(posts), env=env).returncode == 0
    root = tmp_path / "data" / "objects"
    (old_key,) = [k for (k,) in query(db.dsn, "SELECT storage_key FROM post_media")]
    assert old_key.endswith(".jpg")
    (root / old_key).write_bytes(b"rotten bytes")  # damaged behind the archive's back
    found = run_etl("verify", env=env)
    assert found.returncode == ExitCode.PARTIAL and "changed 1" in found.stdout, found.stdout + found.stderr

    http_server.routes["/img"] = Reply(body=png_bytes(30, 20), content_type="image/png")
    repair = run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "empty.jsonl", [])), env=env)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    (new_key,) = [k for (k,) in query(db.dsn, "SELECT storage_key FROM post_media WHERE status = 'stored'")]
    assert new_key.endswith(".png") and (root / new_key).is_file() and not (root / old_key).exists()
    after = run_etl("verify", env=env)
    out = after.stdout + after.stderr
    assert after.returncode == ExitCode.OK and "unexpected objects 0" in out, out


def test_a_sample_rotates_and_an_interrupted_verify_is_continued(db, make_settings, tmp_path, monkeypatch):
    from etl import verify as verify_module
    from etl.store import LocalStore

    settings = make_settings()
    store = LocalStore(settings.objects_dir)
    store.check()
    with db.transaction() as cur:
        for i in range(6):
            body = f"image {i}".encode()
            key = f"jsonl/2024/03/01/p{i}/0.png"
            store.put(key, body, "image/png", hashlib.sha256(body).hexdigest())
            cur.execute(
                "INSERT INTO social_posts (platform, post_id, created_at) VALUES ('jsonl', %s, '2024-03-01')", (f"p{i}",)
            )
            cur.execute(
                "INSERT INTO post_media (platform, post_id, position, source_url, storage_key, sha256, bytes, status)"
                " VALUES ('jsonl', %s, 0, 'http://x/', %s, %s, %s, 'stored')",
                (f"p{i}", key, hashlib.sha256(body).hexdigest(), len(body)),
            )

    def verify_once(scope, stop_after_batches=None):
        batches = []
        verifier = verify_module.Verifier(
            settings, db, store, should_stop=lambda: stop_after_batches is not None and len(batches) >= stop_after_batches
        )
        original = verifier._record
        monkeypatch.setattr(verifier, "_record", lambda rows, results, stats: (batches.append(len(rows)), original(rows, results, stats)))
        run_id = Ledger(db).start_run("verify", ["*"], {"scope": scope.arguments()})
        stats = verifier.run(scope)
        Ledger(db).finish_run(run_id, stats.status, stats.ledger())
        return stats

    monkeypatch.setattr(verify_module, "BATCH", 2)
    sample = verify_module.Scope(sample=0.5)
    first = verify_once(sample)
    second = verify_once(sample)
    seen = query(db.dsn, "SELECT post_id FROM post_media WHERE verified_at IS NOT NULL ORDER BY post_id")
    assert (first.checked, second.checked, len(seen)) == (3, 3, 6)  # two halves, not the same one twice
    assert not first.listed  # a sample does not list the store

    full = verify_module.Scope()
    interrupted = verify_once(full, stop_after_batches=1)
    assert interrupted.status == "interrupted" and interrupted.checked == 2
    resumed = verify_once(full)
    assert resumed.resumed_from is not None and resumed.checked == 4 and resumed.ok == 4 and resumed.listed
    assert verify_once(full).checked == 6  # a finished check: the next one starts again from the start


def _run_jsonl(settings, posts: Path, **request):
    """One run of the jsonl file `posts`, in process (RunRequest's other fields in `request`)."""
    from etl.run.runner import Runner, RunRequest

    runner = Runner(settings)
    try:
        return runner.execute(RunRequest(sources=["jsonl"], source_options={"jsonl": {"input": str(posts)}}, **request))
    finally:
        runner.close()


def _one_stored_image(db, make_settings, *, stored: bytes, recorded: bytes) -> tuple:
    """(settings, local store, key) of post p0's image 0: the object holds `stored`, its row says `recorded`."""
    from etl.store import LocalStore

    settings = make_settings()
    store = LocalStore(settings.objects_dir)
    store.check()
    key = "jsonl/2024/03/01/p0/0.png"
    store.put(key, stored, "image/png", hashlib.sha256(stored).hexdigest())
    _record_stored_image(db, "p0", key, recorded)
    return settings, store, key


def _record_stored_image(db, post_id: str, key: str, body: bytes) -> None:
    """A post of 2024-03-01 and its image 0, recorded stored under `key` as `body` (whatever the object holds)."""
    with db.transaction() as cur:
        cur.execute("INSERT INTO social_posts (platform, post_id, created_at) VALUES ('jsonl', %s, '2024-03-01')", (post_id,))
        cur.execute(
            "INSERT INTO post_media (platform, post_id, position, source_url, storage_key, sha256, bytes, status)"
            " VALUES ('jsonl', %s, 0, 'http://x/', %s, %s, %s, 'stored')",
            (post_id, key, hashlib.sha256(body).hexdigest(), len(body)),
        )


@pytest.mark.fault("a run forgets a post (deleted at source) and repairs another while verify reads them: neither is judged")
def test_verify_does_not_judge_rows_a_run_forgot_or_stored_again_while_it_read_them(db, make_settings, monkeypatch):
    # verify read the rows, then a run forgot p0 (its object deleted) and stored p1 again (another object, another
    # sha256): verify reported p0 missing and p1 changed, and marked the freshly repaired p1 failed.
    from etl import verify as verify_module
    from etl.forget import forget_posts
    from etl.store import LocalStore

    settings = make_settings(ETL_CONCURRENCY="1")  # the objects read one after another: the run lands before all
    store = LocalStore(settings.objects_dir)
    store.check()
    for i in range(3):
        body = png_bytes(8, 6, (i, 0, 0))
        key = f"jsonl/2024/03/01/p{i}/0.png"
        store.put(key, body, "image/png", hashlib.sha256(body).hexdigest())
        _record_stored_image(db, f"p{i}", key, body)
    verifier = verify_module.Verifier(settings, db, store)
    check = verifier._check
    done = []

    def check_after_a_run(row):
        if not done:  # the run lands after the scan read the batch, before the objects are read
            done.append(True)
            forget_posts(db, store, settings, [("jsonl", "p0", None)], "deleted at source: test")
            repaired = png_bytes(9, 9, (0, 9, 0))
            key = "jsonl/2024/03/01/p1/0.png"
            store.put(key, repaired, "image/png", hashlib.sha256(repaired).hexdigest(), replace=True)
            with db.transaction() as cur:
                cur.execute("UPDATE post_media SET sha256 = %s, bytes = %s WHERE post_id = 'p1'",
                            (hashlib.sha256(repaired).hexdigest(), len(repaired)))  # fmt: skip
        return check(row)

    monkeypatch.setattr(verifier, "_check", check_after_a_run)
    stats = verifier.run(verify_module.Scope())
    assert (stats.missing, stats.changed, stats.ok, stats.changed_meanwhile) == (0, 0, 1, 2), stats.problems
    assert query(db.dsn, "SELECT post_id, status, fixity FROM post_media ORDER BY post_id") == [
        ("p1", "stored", None), ("p2", "stored", "ok")
    ]
    assert not stats.partial


# -- deletions --------------------------------------------------------------------------------------


def test_forget_a_post_removes_rows_objects_and_keeps_it_out_of_later_runs(db, run_etl, http_server, tmp_path):
    serve_images(http_server)
    posts = four_posts(http_server, tmp_path)
    assert run_etl("run", "--source", "jsonl", "--input", str(posts), env=BASE_ENV).returncode == 0
    root = tmp_path / "data" / "objects"
    key = keys_by_post(db.dsn)["p1"]
    stray = root / Path(key).parent / "7.png"  # an upload whose row was never written
    stray.write_bytes(b"x")

    done = run_etl("forget", "--post", "jsonl:p1", "--reason", "author request 2026-11-29")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 object(s) deleted" in done.stdout
    assert not (root / key).exists() and not stray.exists() and not (root / Path(key).parent).exists()
    for table in ("social_posts", "post_media", "post_engagement"):
        assert query(db.dsn, f"SELECT count(*) FROM {table} WHERE post_id = 'p1'") == [(0,)], table
    assert query(db.dsn, "SELECT platform, post_id, reason FROM forgotten_posts") == [
        ("jsonl", "p1", "author request 2026-11-29")
    ]

    again = run_etl("run", "--source", "jsonl", "--input", str(posts), env=BASE_ENV)
    assert again.returncode == 0, again.stdout + again.stderr
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE post_id = 'p1'") == [(0,)]
    assert not (root / key).exists()
    assert "1 forgotten post(s) not archived again" in again.stdout
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(3,)]


@pytest.mark.fault("forget lands while a run is between its lookup and its load: it waits for the run, and nothing comes back")
def test_a_forget_during_a_run_waits_for_it_and_nothing_comes_back(db, run_etl, make_settings, http_server, tmp_path, monkeypatch):
    import subprocess
    import sys

    from etl.run.archiver import Archiver
    from etl.run.runner import Runner, RunRequest

    serve_images(http_server)
    settings = _run_settings(db, make_settings)
    posts = four_posts(http_server, tmp_path)
    forget: list[subprocess.Popen] = []
    plan = Archiver.plan

    def plan_then_forget(self, batch, stats, source):
        planned = plan(self, batch, stats, source)  # the lookup: no tombstone yet
        if not forget:  # `etl.py forget --post jsonl:p1` from another shell, now
            env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": db.dsn, "ETL_DATA_DIR": str(tmp_path / "data"),
                   "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}  # fmt: skip
            forget.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve().parent.parent / "etl.py"), "forget", "--post", "jsonl:p1"],
                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))  # fmt: skip
            assert "waiting for run 1 (run, on" in forget[0].stdout.readline()  # it waits for this run
        return planned

    monkeypatch.setattr(Archiver, "plan", plan_then_forget)
    runner = Runner(settings)
    try:
        assert runner.execute(RunRequest(sources=["jsonl"], source_options={"jsonl": {"input": str(posts)}})).exit_code == 0
    finally:
        runner.close()
    out, err = forget[0].communicate(timeout=120)
    assert forget[0].returncode == 0 and "Forgot 1 post(s) (1 archived): 1 object(s) deleted" in out, out + err
    for table in ("social_posts", "post_media"):
        assert query(db.dsn, f"SELECT post_id FROM {table} ORDER BY 1") == [("p0",), ("p2",), ("p3",)], table
    assert not list((tmp_path / "data" / "objects").rglob("p1"))  # its images were stored by the run, then deleted

    # Nothing running: forget does not wait. With --wait 0 and a run holding the archive, it says who, exit 75.
    assert "waiting" not in run_etl("forget", "--post", "jsonl:p2").stdout
    lock, _ = Ledger(db).lock_units(["jsonl"])  # as a run holds it
    try:
        busy = run_etl("forget", "--post", "jsonl:p3", "--wait", "0")
    finally:
        release_locks(lock)
    assert busy.returncode == ExitCode.LOCKED and "the archive is in use by" in busy.stderr, busy.stdout + busy.stderr
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE post_id = 'p3'") == [(1,)]


@pytest.mark.fault("a post forgotten (deleted at source, by another run) while its failed image is retried: the run goes on")
def test_a_post_forgotten_while_its_image_is_retried_costs_nothing_else(db, make_settings, http_server, tmp_path, monkeypatch):
    # The retried image's row broke the foreign key of its gone post: the whole run failed before any source, and
    # the object it had stored stayed with no row. (`etl.py forget` waits for runs; a forget by ETL_DELETED_AT_SOURCE
    # in another run does not.)
    from etl.forget import find_posts, forget_posts
    from etl.run.runner import Runner, RunRequest
    from etl.store import LocalStore, store_from_settings

    http_server.routes["/a.png"] = Reply(status=503, body=b"busy", content_type="text/plain")
    settings = _run_settings(db, make_settings, ETL_IMAGE_RETRY_BACKOFF_MINUTES="0")
    store = store_from_settings(settings)

    def run(path: Path):
        runner = Runner(settings)
        try:
            return runner.execute(RunRequest(sources=["jsonl"], source_options={"jsonl": {"input": str(path)}}))
        finally:
            runner.close()

    run(write_jsonl(tmp_path / "first.jsonl", [record(post_id="p1", image_urls=[http_server.url("/a.png")])]))
    assert query(db.dsn, "SELECT status FROM post_media") == [("failed",)]
    http_server.routes["/a.png"] = Reply(body=png_bytes(20, 10), content_type="image/png")
    put, done = LocalStore.put, []

    def forget_then_put(self, key, *args, **kwargs):  # the forget lands while the retry downloads
        if not done:
            done.append(forget_posts(db, store, settings, find_posts(db, post=("jsonl", "p1")), "deleted at source"))
        return put(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "put", forget_then_put)
    stats = run(write_jsonl(tmp_path / "other.jsonl", [record(post_id="p2", caption="another post")]))
    monkeypatch.undo()
    assert done and stats.exit_code == ExitCode.OK and stats.images_retried == 0
    assert query(db.dsn, "SELECT post_id FROM social_posts") == [("p2",)] and query(db.dsn, "SELECT count(*) FROM post_media") == [(0,)]
    assert not list((tmp_path / "data" / "objects" / "jsonl").rglob("*.png"))  # what the retry stored: deleted


@pytest.mark.fault("a post forgotten between a batch's lookup and its load (another run's deletions at source) stays gone")
def test_a_post_forgotten_after_its_lookup_is_not_loaded_back_nor_its_images_kept(db, make_settings, http_server, tmp_path, monkeypatch):
    # The load wrote every post of its batch: one looked up before the tombstone came back, row and images, though
    # the forget had reported it gone. The same befell a run whose lock connection was lost, when `etl.py forget`
    # came in before the watch noticed.
    from etl.forget import find_posts, forget_posts
    from etl.run.archiver import Archiver
    from etl.store import store_from_settings

    serve_images(http_server)
    settings = _run_settings(db, make_settings)
    plan, forgot = Archiver.plan, []

    def plan_then_forget(self, batch, stats, source):
        planned = plan(self, batch, stats, source)  # the lookup: no tombstone yet
        if not forgot:  # then another run is told p1 is gone, and forgets it, while this one fetches its image
            forgot.append(forget_posts(db, store_from_settings(settings), settings,
                                       find_posts(db, post=("jsonl", "p1")), "deleted at source"))  # fmt: skip
        return planned

    monkeypatch.setattr(Archiver, "plan", plan_then_forget)
    stats = _run_jsonl(settings, four_posts(http_server, tmp_path))
    assert forgot and stats.exit_code == ExitCode.OK, stats.errors
    assert (stats.inserted, stats.forgotten_skipped, stats.images_stored) == (3, 1, 3)
    for table in ("social_posts", "post_media"):
        assert query(db.dsn, f"SELECT post_id FROM {table} ORDER BY 1") == [("p0",), ("p2",), ("p3",)], table
    objects = sorted(p.parent.name for p in (tmp_path / "data" / "objects").rglob("*") if p.is_file())
    assert objects == ["p0", "p2", "p3"]  # the image this run stored for p1: deleted
    assert query(db.dsn, "SELECT post_id FROM forgotten_posts") == [("p1",)]


@pytest.mark.fault("a forget whose tombstone comes while a load of the same post is under way waits for it, then deletes it all")
def test_a_tombstone_waits_for_a_load_under_way_and_its_post_does_not_come_back(db, make_settings, http_server, tmp_path, monkeypatch):
    # The tombstone was recorded at once and the forget deleted the rows it could see; the load, committing after,
    # brought the post back with its image row (the object, stored before the load, it had deleted).
    import threading

    import etl.db.archive as archive
    from etl.db import Database
    from etl.forget import find_posts, forget_posts
    from etl.store import store_from_settings

    serve_images(http_server)
    settings = _run_settings(db, make_settings)
    upsert_media, forget, finished_while_loading = archive.upsert_media, [], []

    def forget_p1() -> None:
        other = Database(db.dsn, display="another run")
        try:
            forget_posts(other, store_from_settings(settings), settings, find_posts(other, post=("jsonl", "p1")), "gone")
        finally:
            other.close()

    def forget_during_the_load(cur, media):  # the batch's posts are written, not committed
        if not forget:
            forget.append(threading.Thread(target=forget_p1))
            forget[0].start()
            forget[0].join(1.5)
            finished_while_loading.append(not forget[0].is_alive())
        return upsert_media(cur, media)

    monkeypatch.setattr(archive, "upsert_media", forget_during_the_load)
    stats = _run_jsonl(settings, four_posts(http_server, tmp_path))
    forget[0].join(60)
    assert stats.exit_code == ExitCode.OK and stats.inserted == 4, stats.errors
    assert finished_while_loading == [False]  # it waited for the load to commit
    for table in ("social_posts", "post_media"):
        assert query(db.dsn, f"SELECT post_id FROM {table} ORDER BY 1") == [("p0",), ("p2",), ("p3",)], table
    objects = sorted(p.parent.name for p in (tmp_path / "data" / "objects").rglob("*") if p.is_file())
    assert objects == ["p0", "p2", "p3"]


def _gated(body: bytes, content_type: str):
    """A route answering only once `release` is set; `arrived` is set when a request came."""
    import threading

    arrived, release = threading.Event(), threading.Event()

    def route(handler):
        arrived.set()
        release.wait(30)
        return Reply(body=body, content_type=content_type)

    return route, arrived, release


def _downloads_ended(prefix: str) -> None:
    """Wait (at most 15 s) for the image threads a stop left behind to end, as they do in a process that lives on."""
    import threading
    import time

    deadline = time.monotonic() + 15
    while any(t.name.startswith(prefix) for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.fault("SIGTERM while the image of a post forgotten meanwhile downloads: the download the stop left behind stores nothing")
def test_a_download_the_stop_left_behind_keeps_no_image_of_a_post_forgotten_meanwhile(db, make_settings, http_server, tmp_path, monkeypatch):
    # The download outlived ETL_STOP_GRACE and was recorded failed; the load left out its post (forgotten since its
    # lookup) but had no key to delete; the download then stored the image, which nothing would ever delete.
    import threading

    from etl.forget import find_posts, forget_posts
    from etl.run.archiver import Archiver
    from etl.store import store_from_settings

    serve_images(http_server)
    http_server.routes["/b.jpg"] = Reply(body=IMAGES["/b.jpg"], content_type="image/jpeg", delay=2.0)  # p1's: slow
    settings = _run_settings(db, make_settings, ETL_STOP_GRACE="0.3")
    plan, forgot = Archiver.plan, []

    def plan_then_forget_and_stop(self, batch, stats, source):
        planned = plan(self, batch, stats, source)
        if not forgot:
            forgot.append(forget_posts(db, store_from_settings(settings), settings,
                                       find_posts(db, post=("jsonl", "p1")), "deleted at source"))  # fmt: skip
            threading.Timer(0.5, self.stop.set).start()  # SIGTERM while p1's image downloads
        return planned

    monkeypatch.setattr(Archiver, "plan", plan_then_forget_and_stop)
    stats = _run_jsonl(settings, four_posts(http_server, tmp_path))
    assert stats.interrupted and query(db.dsn, "SELECT count(*) FROM social_posts WHERE post_id = 'p1'") == [(0,)]
    _downloads_ended("images")
    objects = sorted(p.parent.name for p in (tmp_path / "data" / "objects").rglob("*") if p.is_file())
    assert "p1" not in objects, f"an image of the forgotten post p1 is in the store: {objects}"


@pytest.mark.fault("a verify repair a stop left behind, of a post forgotten meanwhile: it stores nothing")
def test_a_repair_the_stop_left_behind_keeps_no_image_of_a_post_forgotten_meanwhile(db, make_settings, http_server, tmp_path):
    # verify found p1's image damaged; a retry fetches it again (replace); the post is forgotten meanwhile (its object
    # and rows deleted); the stop leaves the download behind, which then wrote the object again, for good.
    import threading

    from etl.db import Database
    from etl.forget import find_posts, forget_posts
    from etl.run.archiver import Archiver
    from etl.run.stats import RunStats
    from etl.store import store_from_settings

    body = png_bytes(20, 10, (255, 0, 0))
    http_server.routes["/a.png"] = Reply(body=body, content_type="image/png")
    settings = _run_settings(db, make_settings, ETL_STOP_GRACE="0.2", ETL_IMAGE_RETRY_BACKOFF_MINUTES="0")
    assert _run_jsonl(settings, write_jsonl(tmp_path / "in.jsonl", [record(post_id="p1", image_urls=[http_server.url("/a.png")])])).images_stored == 1
    [(key,)] = query(db.dsn, "SELECT storage_key FROM post_media")
    root = tmp_path / "data" / "objects"
    (root / key).write_bytes(body[:40])  # damaged, and recorded so as verify does
    with db.transaction() as cur:
        cur.execute("UPDATE post_media SET status = 'failed', fixity = 'changed', attempts = 0, permanent = false")
    route, arrived, release = _gated(body, "image/png")
    http_server.routes["/a.png"] = route
    run_db = Database(db.dsn, display="the run")
    archiver = Archiver(settings, run_db, store_from_settings(settings), stop=threading.Event())
    retry = threading.Thread(target=archiver.retry_failed_images, args=(RunStats(),))
    try:
        retry.start()
        assert arrived.wait(10), "the repair was not requested"
        forgot = forget_posts(db, store_from_settings(settings), settings, find_posts(db, post=("jsonl", "p1")), "gone")
        assert forgot.tombstones == 1 and not (root / key).exists()
        archiver.stop.set()  # SIGTERM while the repair downloads: it is left behind
        retry.join(20)
        assert not retry.is_alive()
    finally:
        release.set()
        _downloads_ended("retry")
        run_db.close()
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".incoming" not in p.parts)
    assert left == [], f"an image of the forgotten post p1 is in the store for good: {left}"


@pytest.mark.fault("a download a stop left behind ends after another run stored the same image: that run's object stays")
def test_a_download_the_stop_left_behind_leaves_another_runs_image_alone(db, make_settings, http_server, tmp_path, monkeypatch):
    # Run A is stopped while p1's image downloads (left behind, recorded failed); run B stores the same image under the
    # same key and records it; then A's download ends. It must neither delete nor replace what B recorded.
    import threading

    from etl.run.archiver import Archiver

    body = jpeg_bytes(30, 20)
    route, arrived, release = _gated(body, "image/jpeg")
    http_server.routes["/slow.jpg"] = route
    http_server.routes["/fast.jpg"] = Reply(body=body, content_type="image/jpeg")
    settings = _run_settings(db, make_settings, ETL_STOP_GRACE="0.2", ETL_IMAGE_RETRY_BACKOFF_MINUTES="60")
    plan, armed = Archiver.plan, [True]

    def plan_then_stop(self, batch, stats, source):
        planned = plan(self, batch, stats, source)
        if armed:  # run A only: SIGTERM while its image downloads
            armed.clear()
            threading.Thread(target=lambda: (arrived.wait(10), self.stop.set()), daemon=True).start()
        return planned

    monkeypatch.setattr(Archiver, "plan", plan_then_stop)
    try:
        a = _run_jsonl(settings, write_jsonl(tmp_path / "a.jsonl", [record(post_id="p1", image_urls=[http_server.url("/slow.jpg")])]))
        assert a.interrupted and query(db.dsn, "SELECT status FROM post_media") == [("failed",)]
        b = _run_jsonl(settings, write_jsonl(tmp_path / "b.jsonl", [record(post_id="p1", image_urls=[http_server.url("/fast.jpg")])]))
        assert b.images_stored == 1
    finally:
        release.set()  # run A's download, left behind, ends now
        _downloads_ended("images")
    [(status, key, sha256)] = query(db.dsn, "SELECT status, storage_key, sha256 FROM post_media")
    stored = tmp_path / "data" / "objects" / key
    assert status == "stored" and stored.is_file() and hashlib.sha256(stored.read_bytes()).hexdigest() == sha256


@pytest.mark.fault("a tombstone's session stalls inside its transaction (process stopped, network cut): the server ends it, loads go on")
def test_a_stalled_tombstone_holds_up_the_loads_only_until_the_server_ends_its_session(db, make_settings, tmp_path):
    # A tombstone holds the loads' lock exclusive for its transaction: stalled there, it held up every load of every
    # run for as long as the server kept the session (hours, after a network cut).
    import threading

    import psycopg2
    import psycopg2.extras

    from etl.db import archive, deletions

    short = deletions.TOMBSTONE_SQL.replace(f"'{archive.LOADS_IDLE_LIMIT}'", "'1s'")
    assert short != deletions.TOMBSTONE_SQL
    stalled = psycopg2.connect(db.dsn)
    with stalled.cursor() as cur:  # the tombstone's statement, then its client stops before COMMIT
        psycopg2.extras.execute_values(cur, short, [("jsonl", "elsewhere", None)], template=deletions._TOMBSTONE_ROW)
    posts = write_jsonl(tmp_path / "in.jsonl", [record(post_id=f"q{i}") for i in range(5)])
    settings = _run_settings(db, make_settings)
    ran = []
    run = threading.Thread(target=lambda: ran.append(_run_jsonl(settings, posts)), daemon=True)
    run.start()
    run.join(20)
    try:
        assert ran and ran[0].exit_code == ExitCode.OK and ran[0].inserted == 5, "the run's load still waits"
        with pytest.raises(psycopg2.OperationalError):  # the server ended the stalled session: its tombstone undone
            stalled.cursor().execute("SELECT 1")
        assert query(db.dsn, "SELECT count(*) FROM forgotten_posts") == [(0,)]
    finally:
        stalled.close()


@pytest.mark.fault("a load's session stalls inside its transaction: the server ends it, a forget waiting for it goes on")
def test_a_stalled_load_holds_up_a_forget_only_until_the_server_ends_its_session(db, run_etl, make_settings, tmp_path):
    import threading

    import psycopg2

    from etl.db import archive
    from etl.forget import find_posts, forget_posts

    run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "in.jsonl", [record(post_id="p1")])))
    short = archive.LOAD_LOCK_SQL.replace(f"'{archive.LOADS_IDLE_LIMIT}'", "'1s'")
    assert short != archive.LOAD_LOCK_SQL
    stalled = psycopg2.connect(db.dsn)
    stalled.cursor().execute(short)  # a load's first statement, then its client stops before COMMIT
    forgot = []
    settings = make_settings()
    forget = threading.Thread(target=lambda: forgot.append(
        forget_posts(db, None, settings, find_posts(db, post=("jsonl", "p1")), "deleted at source")), daemon=True)
    forget.start()
    forget.join(20)
    try:
        assert forgot and forgot[0].tombstones == 1, "the forget still waits for the stalled load"
        assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(0,)]
    finally:
        stalled.close()


@pytest.mark.fault("a load stalls inside its transaction past the idle limit: the server ends its session, the batch is written again, once")
def test_a_load_whose_session_the_server_ended_is_written_again_once(db, monkeypatch):
    # Database.run counted its reconnect budget (ETL_DB_RECONNECT_SECONDS) from the start of the transaction: a load
    # the server ended after LOADS_IDLE_LIMIT (60 s, more than the default budget of 15 s) had spent it, and the run
    # stopped (LoadError) instead of writing the batch again. Here: a limit of 1 s, a stall of 2.5 s, a budget of 1 s.
    import time
    from datetime import datetime, timezone

    from etl.db import Database, archive
    from etl.records import Media, Post

    def post(likes: int) -> Post:
        return Post("jsonl", "p1", datetime(2024, 3, 1, 12, tzinfo=timezone.utc), caption="hello", like_count=likes)

    loads = Database(db.dsn, display="the run", reconnect_seconds=1)
    try:
        archive.Archive(loads).load([post(3)], [], {}, "v1", what="the first batch")
        short = archive._STAGE_POSTS_PREPARE_SQL.replace(f"'{archive.LOADS_IDLE_LIMIT}'", "'1s'")
        assert short != archive._STAGE_POSTS_PREPARE_SQL
        monkeypatch.setattr(archive, "_STAGE_POSTS_PREPARE_SQL", short)
        real, stalls = archive.upsert_media, []

        def stalled(cur, media):  # inside the transaction, after the posts' statement: the process stops a while
            if not stalls:
                time.sleep(2.5)
                stalls.append(2.5)
            return real(cur, media)

        monkeypatch.setattr(archive, "upsert_media", stalled)
        failed = Media("jsonl", "p1", 0, "https://example.com/a.png", status="failed", error="boom")
        counts = archive.Archive(loads).load([post(5)], [failed], {}, "v1", what="the second batch")
    finally:
        loads.close()
    assert stalls and (counts.inserted, counts.updated, counts.unchanged, counts.snapshots) == (0, 1, 0, 1)
    assert query(db.dsn, "SELECT like_count FROM social_posts") == [(5,)]
    assert query(db.dsn, "SELECT count(*) FROM post_engagement_changes") == [(1,)]
    assert query(db.dsn, "SELECT count(*) FROM post_media") == [(1,)]


def _forget_stopped_after_its_tombstone(db, store, settings, post_id: str, monkeypatch) -> None:
    """A forget that wrote its tombstone and stopped (connection lost) before deleting the post's rows."""
    import etl.forget as forget

    def lost(*args, **kwargs):
        raise RuntimeError("server closed the connection unexpectedly")

    with monkeypatch.context() as patch:
        patch.setattr(forget, "delete_post_rows", lost)
        with pytest.raises(RuntimeError):
            forget.forget_posts(db, store, settings, forget.find_posts(db, post=("jsonl", post_id)), "request")


@pytest.mark.fault("a forget stopped after its tombstone, before the rows: later runs do not fetch the post's failed image again")
def test_a_tombstoned_posts_failed_image_is_not_retried(db, run_etl, http_server, make_settings, tmp_path, monkeypatch):
    # The retry queue did not look at tombstones: the next run downloaded the forgotten post's image and stored it.
    from etl.store import store_from_settings

    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_IMAGE_RETRY_BACKOFF_MINUTES": "0"}
    http_server.routes["/img.png"] = Reply(status=503, body=b"busy", content_type="text/plain")
    posts = write_jsonl(tmp_path / "p.jsonl", [record(post_id="gone", image_urls=[http_server.url("/img.png")])])
    first = run_etl("run", "--source", "jsonl", "--input", str(posts), env=env)
    assert query(db.dsn, "SELECT status FROM post_media") == [("failed",)], first.stdout + first.stderr
    settings = make_settings()
    _forget_stopped_after_its_tombstone(db, store_from_settings(settings), settings, "gone", monkeypatch)
    assert query(db.dsn, "SELECT count(*) FROM forgotten_posts") == [(1,)]

    http_server.routes["/img.png"] = Reply(body=png_bytes(12, 9), content_type="image/png")
    hits_before = http_server.hits.get("/img.png", 0)
    run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "empty.jsonl", [])), env=env)
    stored = [p for p in (tmp_path / "data" / "objects").rglob("*") if p.is_file() and "/jsonl/" in str(p)]
    requested = http_server.hits.get("/img.png", 0) - hits_before
    rows = query(db.dsn, "SELECT count(*) FROM post_media WHERE status = 'stored'")[0][0]
    assert (requested, stored, rows) == (0, [], 0), f"requested {requested} time(s), objects {stored}, stored rows {rows}"


@pytest.mark.fault("a forget stops after its tombstone while the post's failed image is retried: the image is not recorded")
def test_an_image_retried_while_its_post_is_tombstoned_is_dropped(db, make_settings, http_server, tmp_path, monkeypatch):
    # The retry saw the post's row (the forget had not deleted it) and recorded the image of a forgotten post.
    from etl.run.runner import Runner, RunRequest
    from etl.store import LocalStore, store_from_settings

    http_server.routes["/a.png"] = Reply(status=503, body=b"busy", content_type="text/plain")
    settings = _run_settings(db, make_settings, ETL_IMAGE_RETRY_BACKOFF_MINUTES="0")
    store = store_from_settings(settings)

    def run(path: Path):
        runner = Runner(settings)
        try:
            return runner.execute(RunRequest(sources=["jsonl"], source_options={"jsonl": {"input": str(path)}}))
        finally:
            runner.close()

    run(write_jsonl(tmp_path / "first.jsonl", [record(post_id="p1", image_urls=[http_server.url("/a.png")])]))
    http_server.routes["/a.png"] = Reply(body=png_bytes(20, 10), content_type="image/png")
    put, done = LocalStore.put, []

    def tombstone_then_put(self, key, *args, **kwargs):  # the forget lands, and stops, while the retry downloads
        if not done:
            done.append(_forget_stopped_after_its_tombstone(db, store, settings, "p1", monkeypatch))
        return put(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "put", tombstone_then_put)
    stats = run(write_jsonl(tmp_path / "other.jsonl", [record(post_id="p2", caption="another post")]))
    monkeypatch.undo()
    assert done and stats.exit_code == ExitCode.OK and stats.images_retried == 0
    assert query(db.dsn, "SELECT status FROM post_media") == [("failed",)]  # the forget, run again, deletes it
    assert not list((tmp_path / "data" / "objects" / "jsonl").rglob("*.png"))  # what the retry stored: deleted


@pytest.mark.fault("forget --post of a post a killed run stored images of but never recorded: its objects go, whatever their day")
@pytest.mark.parametrize("where", ["local", "s3"])
def test_forget_of_a_post_never_recorded_deletes_what_a_killed_run_stored(db, run_etl, tmp_path, where, request):
    # The post has no row, so no date, so no folder was looked in: the objects stayed after "forgot 1 post(s)".
    env = {**BASE_ENV}
    if where == "s3":
        env = s3_env(request.getfixturevalue("moto_endpoint"))
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        s3.create_bucket(Bucket="trust")

        def put(key: str) -> None:
            s3.put_object(Bucket="trust", Key=key, Body=png_bytes())

        def held() -> list[str]:
            return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="trust").get("Contents", []))

        prefix = "arch/"
    else:
        root = tmp_path / "data" / "objects"

        def put(key: str) -> None:
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(png_bytes())

        def held() -> list[str]:
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))

        prefix = ""
    orphans = [f"{prefix}jsonl/2024/02/29/p9/0.png", f"{prefix}jsonl/2026/11/30/p9/1.png"]
    others = [f"{prefix}jsonl/2024/02/29/p10/0.png", f"{prefix}mastodon/2026/11/30/p9/0.png"]
    for key in orphans + others:
        put(key)
    done = run_etl("forget", "--post", "jsonl:p9", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 object(s) deleted" in done.stdout, done.stdout
    assert [k for k in held() if k in orphans + others] == sorted(others)  # (moto's buckets outlive a test)
    assert query(db.dsn, "SELECT platform, post_id FROM forgotten_posts") == [("jsonl", "p9")]


def test_forget_an_author_is_a_dry_run_until_yes(db, run_etl, tmp_path):
    lines = [record(post_id=f"a{i}", author_username="ana") for i in range(3)] + [record(post_id="b1", author_username="bo")]
    path = write_jsonl(tmp_path / "posts.jsonl", lines)
    assert run_etl("run", "--source", "jsonl", "--input", str(path)).returncode == 0

    dry = run_etl("forget", "--author", "jsonl:@ana", env={"PGTZ": "America/New_York"})  # a session in another zone
    assert dry.returncode == 0 and "Would forget 3 post(s)" in dry.stdout and "jsonl:a2" in dry.stdout
    created = query(db.dsn, "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM social_posts WHERE post_id = 'a2'")
    assert f"jsonl:a2  {created[0][0]} UTC" in dry.stdout, dry.stdout  # was printed in the session's zone, unlabelled
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(4,)]
    assert query(db.dsn, "SELECT count(*) FROM forgotten_posts") == [(0,)]

    done = run_etl("forget", "--author", "jsonl:ana", "--yes")
    assert done.returncode == 0 and "Forgot 3 post(s)" in done.stdout
    assert query(db.dsn, "SELECT post_id FROM social_posts") == [("b1",)]
    assert query(db.dsn, "SELECT count(*) FROM forgotten_posts WHERE reason IS NULL") == [(3,)]


@pytest.mark.badinput("a forget target that is not PLATFORM:ID, or an author with no posts, is refused naming it")
@pytest.mark.parametrize("args", [("--post", "p1"), ("--post", "jsonl:"), ("--author", "jsonl:nobody")])
def test_forget_refuses_a_malformed_or_empty_target(db, run_etl, args):
    result = run_etl("forget", *args)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert args[0] in result.stderr or "nobody" in result.stderr


@pytest.mark.parametrize("policy", ["mark", "forget"])
def test_a_post_deleted_at_source_is_marked_or_forgotten(db, run_etl, http_server, tmp_path, policy):
    serve_images(http_server)
    posts = four_posts(http_server, tmp_path)
    env = {**BASE_ENV, "ETL_DELETED_AT_SOURCE": policy}
    assert run_etl("run", "--source", "jsonl", "--input", str(posts), env=env).returncode == 0
    key = keys_by_post(db.dsn)["p2"]
    markers = write_jsonl(
        tmp_path / "deleted.jsonl",
        [{"platform": "jsonl", "post_id": "p2", "deleted": True}, {"platform": "jsonl", "post_id": "never-held", "deleted": True}],
    )
    result = run_etl("run", "--source", "jsonl", "--input", str(markers), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"1 post(s) gone at source ({policy})" in result.stdout
    if policy == "mark":
        assert query(db.dsn, "SELECT post_id FROM social_posts WHERE deleted_at_source IS NOT NULL") == [("p2",)]
        assert (tmp_path / "data" / "objects" / key).exists()
        assert query(db.dsn, "SELECT count(*) FROM forgotten_posts") == [(0,)]
    else:
        assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE post_id = 'p2'") == [(0,)]
        assert not (tmp_path / "data" / "objects" / key).exists()
        assert query(db.dsn, "SELECT post_id, reason FROM forgotten_posts") == [
            ("p2", "deleted at source: marked deleted in the input")
        ]
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(4 if policy == "mark" else 3,)]


def test_posts_gone_at_source_for_one_reason_are_forgotten_by_one_tombstone(db, run_etl, make_settings, tmp_path, monkeypatch):
    # Each held post gone at source was forgotten on its own: a tombstone each, and each waits for the loads under way
    # in every run (etl/db/archive.py, LOADS_LOCK), holding up the loads that come after it meanwhile.
    import etl.forget as forget

    run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "in.jsonl", [record(post_id=f"p{i}") for i in range(5)])))
    tombstone, batches = forget.tombstone, []

    def counted(db_, keys, reason):
        batches.append((sorted(k[1] for k in keys), reason))
        return tombstone(db_, keys, reason)

    monkeypatch.setattr(forget, "tombstone", counted)
    gone = [("jsonl", "p0", "404"), ("jsonl", "p1", "404"), ("jsonl", "p2", "suspended"), ("jsonl", "p3", "404"),
            ("jsonl", "never-held", "404")]  # fmt: skip
    assert forget.apply_gone(db, None, make_settings(ETL_DELETED_AT_SOURCE="forget"), gone) == 4
    assert sorted(batches) == [(["p0", "p1", "p3"], "deleted at source: 404"), (["p2"], "deleted at source: suspended")]
    assert query(db.dsn, "SELECT post_id FROM social_posts") == [("p4",)]
    assert query(db.dsn, "SELECT post_id, reason FROM forgotten_posts ORDER BY 1") == [
        ("p0", "deleted at source: 404"), ("p1", "deleted at source: 404"), ("p2", "deleted at source: suspended"),
        ("p3", "deleted at source: 404"),
    ]  # fmt: skip


# -- language ---------------------------------------------------------------------------------------


def test_posts_in_another_language_get_no_label_and_status_says_why(db, run_etl, tmp_path):
    lines = [
        record(post_id="en", caption="What a lovely sunny day at the beach with friends"),
        record(post_id="fr-given", caption="What a lovely day", lang="fr"),  # the platform's word wins
        record(post_id="fr-detected", caption="Quelle journée magnifique à la plage avec des amis"),
        record(post_id="short", caption="great"),  # too short to tell: scored as before
        record(post_id="en-us", caption="Terrible service", lang="en-US"),
        record(post_id="und", caption="Awful, awful queue", lang="und"),
    ]
    result = run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "p.jsonl", lines)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not scored 2 (not English)" in result.stdout
    rows = {r[0]: r[1:] for r in query(db.dsn, "SELECT post_id, sentiment, language, language_source, sentiment_skipped FROM social_posts")}
    assert rows["en"] == ("positive", "en", "detected", None)
    assert rows["fr-given"] == (None, "fr", "platform", "language fr")
    assert rows["fr-detected"] == (None, "fr", "detected", "language fr")
    assert rows["short"] == ("positive", None, None, None)
    assert rows["en-us"] == ("negative", "en-us", "platform", None)
    assert rows["und"][0] == "negative" and rows["und"][2] != "platform"
    status = run_etl("status")
    assert "Posts without a sentiment label" in status.stdout and "language fr" in status.stdout
    # A rerun decides nothing again and changes nothing.
    rerun = run_etl("run", "--source", "jsonl", "--input", str(tmp_path / "p.jsonl"))
    assert "unchanged 6" in rerun.stdout, rerun.stdout


@pytest.mark.badinput("a jsonl lang that is not a language tag is refused by line number")
def test_a_malformed_lang_is_refused_by_line(db, run_etl, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [record(post_id="ok"), record(post_id="bad", lang="not a tag!")])
    result = run_etl("run", "--source", "jsonl", "--input", str(path))
    assert result.returncode == ExitCode.PARTIAL
    assert "line 2" in result.stdout + result.stderr and "lang" in result.stdout + result.stderr
    assert query(db.dsn, "SELECT post_id FROM social_posts") == [("ok",)]


def test_reenrich_removes_the_label_of_stored_non_english_posts(db, run_etl):
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO social_posts (platform, post_id, caption, sentiment, sentiment_polarity, sentiment_subjectivity,"
            " sentiment_version, raw, created_at) VALUES"
            " ('x', 'de', 'Das ist ein wunderschöner Tag am Strand mit meinen Freunden', 'neutral', 0, 0, 'old', NULL, now()),"
            " ('x', 'en', 'What a wonderful day at the beach with my friends', 'positive', 1, 1, 'old', NULL, now())"
        )
    result = run_etl("reenrich")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not scored 1 (not English)" in result.stdout
    rows = dict(query(db.dsn, "SELECT post_id, COALESCE(sentiment, 'NULL') || '/' || COALESCE(sentiment_skipped, '-') FROM social_posts"))
    assert rows == {"de": "NULL/language de", "en": "positive/-"}


def test_language_comes_from_twitter_and_youtube_items():
    from etl.sources.twitter import tweet_to_post

    tweet = {"id": "1", "created_at": "2024-03-01T00:00:00Z", "text": "hola", "lang": "es", "public_metrics": {}}
    post = tweet_to_post(tweet, {}, {})
    assert (post.language, post.language_source) == ("es", "platform")
    assert tweet_to_post({**tweet, "lang": "qme"}, {}, {}).language is None  # X: media links only


# -- engagement history -----------------------------------------------------------------------------


def test_engagement_snapshots_only_on_change_and_the_fastest_growing_view(db, run_etl, tmp_path):
    def run(counts: dict[str, tuple[int, int]]):
        lines = [record(post_id=pid, like_count=likes, comment_count=comments) for pid, (likes, comments) in counts.items()]
        result = run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "p.jsonl", lines)))
        assert result.returncode == 0, result.stdout + result.stderr

    run({"slow": (1, 0), "fast": (1, 0), "still": (5, 5)})
    assert query(db.dsn, "SELECT count(*) FROM post_engagement") == [(3,)]  # the first counts of each
    assert query(db.dsn, "SELECT count(*) FROM post_engagement_changes") == [(0,)]  # kept on the posts' rows
    since = query(db.dsn, "SELECT now()")[0][0]
    run({"slow": (1, 0), "fast": (1, 0), "still": (5, 5)})
    assert query(db.dsn, "SELECT count(*) FROM post_engagement") == [(3,)]  # nothing changed, nothing written
    run({"slow": (3, 0), "fast": (40, 9), "still": (5, 5)})
    assert query(db.dsn, "SELECT post_id, count(*) FROM post_engagement GROUP BY 1 ORDER BY 1") == [
        ("fast", 2), ("slow", 2), ("still", 1)
    ]  # fmt: skip
    top = query(db.dsn, "SELECT post_id, likes_gained, comments_gained FROM fastest_growing_posts(%s, 10)", (since,))
    assert top == [("fast", 39, 9), ("slow", 2, 0)]
    growth = dict(query(db.dsn, "SELECT post_id, likes_gained FROM post_engagement_growth"))
    assert growth == {"fast": 39, "slow": 2, "still": 0}


def test_an_archive_migrated_to_first_counts_keeps_its_engagement_history_row_for_row(new_database, tmp_path):
    """sql/014 moves each snapshot taken as its post was inserted onto the post's row: the view post_engagement then
    gives the same rows as the table did, and the growth view and fastest_growing_posts() the same answers."""
    from etl.db import Database
    from etl.db.connection import migration_files

    before_014 = tmp_path / "sql"
    before_014.mkdir()
    for version, path in migration_files():
        if version < 14:
            (before_014 / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    db = Database(new_database, display="test database")
    try:
        db.migrate(before_014)
        with db.transaction() as cur:
            cur.execute(
                "INSERT INTO social_posts (platform, post_id, like_count, comment_count, created_at, archived_at) VALUES"
                " ('x', 'grew', 9, 3, '2024-01-01', '2024-02-01'), ('x', 'still', 5, NULL, '2024-01-01', '2024-02-01'),"
                " ('x', 'older', 7, 1, '2023-01-01', '2023-06-01'), ('x', 'uncounted', NULL, NULL, '2024-01-01', '2024-02-01'),"
                " ('y', 'grew', 4, 0, '2024-01-01', '2024-02-03')"
            )  # 'older' was archived before snapshots existed: its first one came later
            cur.execute(
                "INSERT INTO post_engagement (platform, post_id, observed_at, like_count, comment_count) VALUES"
                " ('x', 'grew', '2024-02-01', 1, 0), ('x', 'grew', '2024-02-02', 4, 1), ('x', 'grew', '2024-02-05', 9, 3),"
                " ('x', 'still', '2024-02-01', 5, NULL), ('x', 'older', '2024-01-10', 6, 1), ('x', 'older', '2024-02-04', 7, 1),"
                " ('y', 'grew', '2024-02-03', 2, 0), ('y', 'grew', '2024-02-04', 4, 0)"
            )
        reads = (
            "SELECT * FROM post_engagement ORDER BY platform, post_id, observed_at",
            "SELECT * FROM post_engagement_growth ORDER BY platform, post_id",
            "SELECT * FROM fastest_growing_posts('2024-02-02', 10)",
        )
        before = [query(new_database, sql) for sql in reads]
        assert len(before[0]) == 8 and len(before[1]) == 4 and len(before[2]) == 3
        assert db.migrate()[0] == "014_engagement_first_counts.sql"  # (then any later ones)
        assert [query(new_database, sql) for sql in reads] == before
        assert query(new_database, "SELECT platform, post_id, first_like_count, first_comment_count FROM social_posts ORDER BY 1, 2") == [
            ("x", "grew", 1, 0), ("x", "older", None, None), ("x", "still", 5, None), ("x", "uncounted", None, None),
            ("y", "grew", 2, 0),
        ]  # fmt: skip
        assert query(new_database, "SELECT count(*) FROM post_engagement_changes") == [(5,)]  # the later ones
    finally:
        db.close()


def test_ledger_and_stdout_never_hold_a_secret_in_verify(db, run_etl, tmp_path):
    secret = "sekrit-token-value-123"
    result = run_etl("verify", env={"TWITTER_BEARER_TOKEN": secret})
    assert result.returncode == 0 and secret not in result.stdout + result.stderr
    assert secret not in json.dumps(query(db.dsn, "SELECT row_to_json(r)::text FROM etl_runs r"))


@pytest.mark.fault("a damaged object verify marked for repair is read again by a shard run (no retries): it is repaired")
def test_a_damaged_object_read_again_by_a_shard_run_is_repaired_not_recorded(db, make_settings, http_server, tmp_path):
    # (Found by a hostile review.) verify found the object damaged (still a decodable PNG: bit rot in pixel data, or tampering) and marked the row
    # failed for repair. The next thing to fetch the image is an Airflow shard (archive_shard: retry_images=False,
    # the retry parts are separate tasks) or a backfill re-reading the post: archive_image with replace=False.
    # The store raises KeyHeld, _held_image reads the damaged bytes back and the row records them as 'stored' with
    # their sha256 and fixity cleared: the damage becomes the archive's truth, and no repair will ever come.
    from etl import verify as verify_module
    from etl.shards import Shard
    from etl.store import LocalStore

    good = png_bytes(20, 10, (255, 0, 0))
    http_server.routes["/a.png"] = Reply(body=good, content_type="image/png")
    settings = _run_settings(db, make_settings, ETL_IMAGE_RETRY_BACKOFF_MINUTES="0")
    posts = write_jsonl(tmp_path / "p.jsonl", [record(post_id="p0", image_urls=[http_server.url("/a.png")])])

    def run(**request):
        return _run_jsonl(settings, posts, **request)

    run()
    (key,) = [k for (k,) in query(db.dsn, "SELECT storage_key FROM post_media WHERE status = 'stored'")]
    damaged = png_bytes(20, 10, (0, 0, 0))  # a valid PNG of the key's type: other bytes
    (settings.objects_dir / key).write_bytes(damaged)
    store = LocalStore(settings.objects_dir)
    stats = verify_module.Verifier(settings, db, store).run(verify_module.Scope())
    assert stats.changed == 1
    assert query(db.dsn, "SELECT status, fixity FROM post_media") == [("failed", "changed")]

    run(shard=Shard.parse("1/1"), retry_images=False)  # as orchestrate.archive_shard runs it
    assert (settings.objects_dir / key).read_bytes() == good, "the damaged object was kept"
    assert query(db.dsn, "SELECT sha256 FROM post_media") == [(hashlib.sha256(good).hexdigest(),)]


def test_verify_counts_an_intact_image_forgotten_meanwhile_as_changed_meanwhile_not_ok(db, make_settings, monkeypatch):
    # The object was read intact, then a run forgot the post (ETL_DELETED_AT_SOURCE=forget) before verify recorded
    # its results: FIXITY_OK_SQL matches no row (nothing recorded), yet the summary counts it `ok` and not
    # `changed_meanwhile`, though README says a row changed meanwhile "is not judged by it, counted changed_meanwhile".
    # checked = ok + missing + changed + unreadable + changed_meanwhile no longer holds for what was recorded.
    from etl import verify as verify_module
    from etl.forget import forget_posts

    body = png_bytes(8, 6, (1, 0, 0))
    settings, store, key = _one_stored_image(db, make_settings, stored=body, recorded=body)
    record = verify_module.record_fixity

    def forgotten_then_recorded(db_, ok, bad):
        forget_posts(db, store, settings, [("jsonl", "p0", None)], "deleted at source: test")
        return record(db_, ok, bad)

    monkeypatch.setattr(verify_module, "record_fixity", forgotten_then_recorded)
    stats = verify_module.Verifier(settings, db, store).run(verify_module.Scope())
    assert query(db.dsn, "SELECT count(*) FROM post_media") == [(0,)]
    assert (stats.checked, stats.ok, stats.changed_meanwhile) == (1, 0, 1)


@pytest.mark.fault("the reply to verify's COMMIT is lost and its record is run again: the damage is still reported")
def test_verify_reports_damage_when_its_record_is_run_again_after_a_lost_commit_reply(db, make_settings, monkeypatch):
    # Database.run runs fn again when the connection is lost, and requires fn to be idempotent. record_fixity's
    # writes are, but its result (the ids FIXITY_BAD_SQL's RETURNING marked) is not: when the COMMIT went through and
    # its reply was lost, the second run finds the rows already failed (status <> 'stored'), returns no id, and
    # verify counts the damaged image `changed_meanwhile`: "changed 0", exit 0, no problem reported.
    import contextlib

    import psycopg2

    from etl import verify as verify_module

    settings, store, key = _one_stored_image(db, make_settings, stored=b"rotten", recorded=png_bytes(8, 6, (1, 0, 0)))
    real_transaction, real_record = db.transaction, verify_module.record_fixity
    armed = []

    @contextlib.contextmanager
    def reply_lost_once():
        with real_transaction() as cur:
            yield cur
        if armed:  # committed; the reply never came
            armed.clear()
            raise psycopg2.OperationalError("server closed the connection unexpectedly")

    def record(db_, ok, bad):
        armed.append(True)
        return real_record(db_, ok, bad)

    monkeypatch.setattr(db, "transaction", reply_lost_once)
    monkeypatch.setattr(verify_module, "record_fixity", record)
    stats = verify_module.Verifier(settings, db, store).run(verify_module.Scope())
    assert query(db.dsn, "SELECT status, fixity FROM post_media") == [("failed", "changed")]
    assert (stats.changed, stats.changed_meanwhile) == (1, 0) and stats.partial


def test_a_repair_by_a_shard_run_under_a_new_extension_deletes_the_damaged_object(db, make_settings, http_server, tmp_path):
    # The same as the retries' repair, on the path of a post read again (a shard: no failed-image retries).
    from etl import verify as verify_module
    from etl.shards import Shard
    from etl.store import LocalStore

    http_server.routes["/img"] = Reply(body=jpeg_bytes(30, 20), content_type="image/jpeg")
    settings = _run_settings(db, make_settings)
    posts = write_jsonl(tmp_path / "p.jsonl", [record(post_id="p0", image_urls=[http_server.url("/img")])])

    def run(**request):
        return _run_jsonl(settings, posts, **request)

    run()
    (old_key,) = [k for (k,) in query(db.dsn, "SELECT storage_key FROM post_media")]
    (settings.objects_dir / old_key).write_bytes(b"rotten bytes")
    assert verify_module.Verifier(settings, db, LocalStore(settings.objects_dir)).run(verify_module.Scope()).changed == 1
    http_server.routes["/img"] = Reply(body=png_bytes(30, 20), content_type="image/png")
    assert run(shard=Shard.parse("1/1"), retry_images=False).exit_code == 0
    (new_key,) = [k for (k,) in query(db.dsn, "SELECT storage_key FROM post_media WHERE status = 'stored'")]
    assert new_key.endswith(".png") and (settings.objects_dir / new_key).is_file()
    assert not (settings.objects_dir / old_key).exists()
