"""End to end over real HTTP: etl.py (a subprocess) imports jsonl, fetches images from a local server,
stores them in moto's S3 server and rows in PostgreSQL; a rerun downloads and uploads nothing again."""

from __future__ import annotations

import hashlib

import pytest

from etl.errors import ExitCode
from tests.conftest import query
from tests.support import Reply, jpeg_bytes, png_bytes, record, s3_client, write_jsonl

pytestmark = pytest.mark.e2e
BUCKET = "e2e-archive"
ACCOUNT = "123456789012"  # moto's default account


def stored_versions(bucket: str) -> dict[str, tuple[int, object]]:
    """Key -> (identity, last_modified) of the object moto holds: a rewrite makes a new object."""
    from moto.s3.models import s3_backends

    keys = s3_backends[ACCOUNT]["aws"].buckets[bucket].keys
    return {name: (id(keys[name]), keys[name].last_modified) for name in keys}


def test_jsonl_to_s3_and_postgres_then_an_idempotent_rerun(db, run_etl, http_server, moto_endpoint, tmp_path):
    s3 = s3_client(moto_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    images = {
        "/a0.png": png_bytes(20, 10, (255, 0, 0)),
        "/a1.jpg": jpeg_bytes(30, 20),
        "/b0.jpg": png_bytes(7, 7, (0, 0, 255)),  # PNG bytes under a .jpg name and an image/jpeg label
    }
    http_server.routes["/a0.png"] = Reply(body=images["/a0.png"], content_type="image/png")
    http_server.routes["/a1.jpg"] = Reply(body=images["/a1.jpg"], content_type="image/jpeg")
    http_server.routes["/b0.jpg"] = Reply(body=images["/b0.jpg"], content_type="image/jpeg")
    path = write_jsonl(
        tmp_path / "posts.jsonl",
        [
            # 23:30 at UTC-5 is the next day in UTC: the key's date is the UTC one.
            record(post_id="a", created_at="2024-03-01T23:30:00-05:00", caption="Loving this #sunset",
                   image_urls=[http_server.url("/a0.png"), http_server.url("/a1.jpg")]),
            record(post_id="b/1", created_at="2024-03-05T10:00:00", caption="Awful queue today",
                   image_url=http_server.url("/b0.jpg"), image_urls=None),
            record(post_id="c", created_at="2024-03-06T10:00:00Z", caption="No pictures here"),
        ],
    )  # fmt: skip
    env = {
        "S3_BUCKET": BUCKET,
        "S3_PREFIX": "archive",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
        "ETL_READ_TIMEOUT": "5",
    }

    first = run_etl("run", "--source", "jsonl", "--input", str(path), env=env)
    assert first.returncode == ExitCode.OK, first.stdout + first.stderr
    assert "inserted 3" in first.stdout and "stored 3" in first.stdout

    expected = {
        "archive/jsonl/2024/03/02/a/0.png": images["/a0.png"],
        "archive/jsonl/2024/03/02/a/1.jpg": images["/a1.jpg"],
        "archive/jsonl/2024/03/05/b%2F1/0.png": images["/b0.jpg"],  # the bytes decide the extension
    }
    listed = s3.list_objects_v2(Bucket=BUCKET)["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(expected)
    for key, body in expected.items():
        obj = s3.get_object(Bucket=BUCKET, Key=key)
        assert obj["Body"].read() == body
        assert obj["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
        assert obj["ContentType"] == ("image/png" if key.endswith(".png") else "image/jpeg")

    media = query(
        db.dsn,
        "SELECT post_id, position, status, storage_key, storage_url, sha256, bytes, content_type, width, height, attempts"
        " FROM post_media ORDER BY post_id, position",
    )
    assert media == [
        ("a", 0, "stored", "archive/jsonl/2024/03/02/a/0.png", f"s3://{BUCKET}/archive/jsonl/2024/03/02/a/0.png",
         hashlib.sha256(images["/a0.png"]).hexdigest(), len(images["/a0.png"]), "image/png", 20, 10, 1),
        ("a", 1, "stored", "archive/jsonl/2024/03/02/a/1.jpg", f"s3://{BUCKET}/archive/jsonl/2024/03/02/a/1.jpg",
         hashlib.sha256(images["/a1.jpg"]).hexdigest(), len(images["/a1.jpg"]), "image/jpeg", 30, 20, 1),
        ("b/1", 0, "stored", "archive/jsonl/2024/03/05/b%2F1/0.png", f"s3://{BUCKET}/archive/jsonl/2024/03/05/b%2F1/0.png",
         hashlib.sha256(images["/b0.jpg"]).hexdigest(), len(images["/b0.jpg"]), "image/png", 7, 7, 1),
    ]  # fmt: skip
    posts = query(
        db.dsn, "SELECT post_id, sentiment, image_s3_url, hashtags, archived_at FROM social_posts ORDER BY post_id"
    )
    assert [(p[0], p[1], p[2], p[3]) for p in posts] == [
        ("a", "positive", f"s3://{BUCKET}/archive/jsonl/2024/03/02/a/0.png", ["sunset"]),
        ("b/1", "negative", f"s3://{BUCKET}/archive/jsonl/2024/03/05/b%2F1/0.png", []),
        ("c", "neutral", None, []),
    ]
    hits = dict(http_server.hits)
    assert hits == {"/a0.png": 1, "/a1.jpg": 1, "/b0.jpg": 1}
    versions = stored_versions(BUCKET)

    second = run_etl("run", "--source", "jsonl", "--input", str(path), env=env)
    assert second.returncode == ExitCode.OK, second.stdout + second.stderr
    assert "unchanged 3" in second.stdout and "already archived 3" in second.stdout
    assert http_server.hits == hits  # no image downloaded again
    assert stored_versions(BUCKET) == versions  # no object rewritten
    assert query(db.dsn, "SELECT post_id, archived_at FROM social_posts ORDER BY post_id") == [
        (p[0], p[4]) for p in posts
    ]
    assert query(db.dsn, "SELECT count(*), max(attempts) FROM post_media") == [(3, 1)]
    runs = query(
        db.dsn,
        "SELECT status, posts_inserted, posts_unchanged, images_stored, images_skipped FROM etl_runs ORDER BY id",
    )
    assert runs == [("ok", 3, 0, 3, 0), ("ok", 0, 3, 0, 3)]

    # A run that died after its uploads but before recording them: the images are fetched again, but
    # objects already in the bucket with the same checksum are not uploaded again.
    with db.transaction() as cur:
        cur.execute("DELETE FROM post_media")
    third = run_etl("run", "--source", "jsonl", "--input", str(path), env=env)
    assert third.returncode == ExitCode.OK, third.stdout + third.stderr
    assert http_server.hits == {name: 2 for name in hits}
    assert stored_versions(BUCKET) == versions
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE status = 'stored'") == [(3,)]


def test_a_missing_bucket_stops_the_run_before_any_work_naming_s3_bucket(db, run_etl, moto_endpoint):
    env = {
        "S3_BUCKET": "no-such-bucket",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    result = run_etl("run", "--source", "mock", env=env)
    assert result.returncode == ExitCode.CONFIG
    assert "S3_BUCKET 'no-such-bucket' does not exist" in result.stderr
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(0,)]
