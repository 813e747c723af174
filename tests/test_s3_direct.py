"""The direct S3 PUT path (S3_DIRECT_PUT): learned from boto3's first PUT, signed here, checked by a real endpoint.

moto's server runs over real HTTP behind the fault proxy of test_faults_s3; with moto's IAM checks switched on,
every request must carry a valid SigV4 signature for an access key moto issued, so a URL, a header or a key
encoded differently from what was signed is refused.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from urllib.parse import quote

import boto3
import pytest
from botocore.credentials import Credentials

from etl.store import DirectPut, KeyHeld, S3Store, object_key
from tests.support import BUCKET, iam_user_key, jpeg_bytes, png_bytes

WHEN = datetime(2026, 10, 3, 12, 0, tzinfo=timezone.utc)
HOSTILE_IDS = ["plain", "a/b", "x y", "%2F", "~tilde", "é😀", "semi;colon&amp=1", "plus+sign"]


@pytest.fixture
def endpoint(moto_s3, monkeypatch):  # noqa: F811
    """(proxy, admin client, make_store): stores reach moto through the proxy with an IAM user's key."""
    proxy, client = moto_s3
    moto_url = client.meta.endpoint_url
    access_key, secret = iam_user_key(moto_url)
    from moto import settings as moto_settings

    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # from now on, every request is checked
    admin = boto3.client(
        "s3", endpoint_url=moto_url, region_name="us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret,
    )  # fmt: skip
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)

    def make_store(make_settings, **env: str) -> tuple[S3Store, list[str]]:
        """A store and the list of URLs boto3 itself sent PUTs to (the rest went the direct way)."""
        store = S3Store(make_settings(S3_BUCKET=BUCKET, AWS_REGION="us-east-1", ETL_HTTP_RETRIES="3", **env))
        by_boto3: list[str] = []
        store.client.meta.events.register("before-send.s3.PutObject", lambda request, **kw: by_boto3.append(request.url))
        store.check()
        return store, by_boto3

    return proxy, admin, make_store


def put_all(store: S3Store, ids: list[str], prefix: str = "arch ive/é/") -> dict[str, bytes]:
    bodies = {}
    for n, post_id in enumerate(ids):
        body = png_bytes(color=(n, 2 * n, 3 * n)) if n % 2 else jpeg_bytes(color=(n, 50, 90))
        ctype = "image/png" if n % 2 else "image/jpeg"
        key = object_key(prefix, "mock", WHEN, post_id, n, ctype)
        assert store.put(key, body, ctype, hashlib.sha256(body).hexdigest()) is True
        bodies[key] = body
    return bodies


def assert_stored(admin, bodies: dict[str, bytes]) -> None:
    for key, body in bodies.items():
        obj = admin.get_object(Bucket=BUCKET, Key=key)
        assert obj["Body"].read() == body, key
        assert obj["ContentType"] == ("image/png" if key.endswith(".png") else "image/jpeg")
        assert obj["Metadata"] == {"sha256": hashlib.sha256(body).hexdigest()}


def test_after_boto3s_first_put_the_rest_are_signed_here_and_accepted(endpoint, make_settings):
    proxy, admin, make_store = endpoint
    store, by_boto3 = make_store(make_settings)
    bodies = put_all(store, HOSTILE_IDS)
    assert len(by_boto3) == 1  # boto3 sent the first; it taught the direct path the URL and the region
    assert store.direct is not None and store.direct.region == "us-east-1"
    assert proxy.forwarded["PUT"] == len(HOSTILE_IDS)  # one request per object, none refused
    assert_stored(admin, bodies)
    grants = admin.get_object_acl(Bucket=BUCKET, Key=next(iter(bodies)))["Grants"]
    assert [g["Permission"] for g in grants] == ["FULL_CONTROL"]  # private, as boto3's PUTs


def test_the_endpoint_really_checks_the_signature(endpoint, make_settings):
    """What makes the test above mean something: a direct PUT signed with the wrong secret is refused."""
    _, admin, make_store = endpoint
    store, _ = make_store(make_settings)
    put_all(store, ["one"])
    assert store.direct is not None
    access_key = store.direct.credentials.get_frozen_credentials().access_key  # a key moto knows, the wrong secret
    wrong = DirectPut(store.direct.base, "us-east-1", Credentials(access_key, "wrong"), pool_size=2, timeout=(2, 5))
    body = png_bytes()
    assert wrong.put("mock/x/0.png", body, "image/png", hashlib.sha256(body).hexdigest()) == 403
    with pytest.raises(Exception, match="NoSuchKey|Not Found|404"):
        admin.head_object(Bucket=BUCKET, Key="mock/x/0.png")


def test_the_recorded_sha256_is_signed_as_the_payload(http_server):
    """S3 refuses a body whose SHA-256 is not the signed x-amz-content-sha256 (XAmzContentSHA256Mismatch). The
    direct path signs the checksum the archive records, so the bucket can only take the bytes that were hashed:
    bytes changed on the way are refused on the direct path (S3 answers 400; S3Store.put then hands that image,
    and every later one, to boto3, which sends the same local bytes again)."""
    from tests.support import Reply

    http_server.routes["/bucket/k/0.png"] = http_server.routes["/bucket/k/1.png"] = Reply(status=200, content_type=None)
    direct = DirectPut(http_server.url("/bucket"), "us-east-1", Credentials("AKID", "secret"), pool_size=2, timeout=(2, 5))
    body = png_bytes()
    assert direct.put("k/0.png", body, "image/png", hashlib.sha256(body).hexdigest()) == 200
    not_its_own = hashlib.sha256(b"other bytes").hexdigest()
    assert direct.put("k/1.png", body, "image/png", not_its_own) == 200  # this server checks nothing; S3 does
    sent = [headers for method, _, headers in http_server.requests if method == "PUT"]
    assert [path for path, _ in http_server.posted] == ["/bucket/k/0.png", "/bucket/k/1.png"]
    assert all(b == body for _, b in http_server.posted)
    for headers, recorded in zip(sent, (hashlib.sha256(body).hexdigest(), not_its_own), strict=True):
        headers = {k.lower(): v for k, v in headers.items()}
        assert headers["x-amz-content-sha256"] == recorded == headers["x-amz-meta-sha256"]
        signed = headers["authorization"].partition("SignedHeaders=")[2].partition(",")[0].split(";")
        assert {"x-amz-content-sha256", "x-amz-meta-sha256", "if-none-match"} <= set(signed)


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE//token+with/slashes=="])
@pytest.mark.parametrize("base", ["http://127.0.0.1:9000/bucket", "https://b.s3.eu-west-1.amazonaws.com", "https://s3.example:8443/b"])
def test_the_signature_is_botocores_own(monkeypatch, base, token):
    """The direct path's SigV4 signature, byte for byte the one botocore's S3 signer makes for the same PUT (hostile
    keys, a session token, path-style and virtual-hosted URLs, a port), with the payload's hash given."""
    import botocore.auth
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    frozen = datetime(2026, 11, 30, 23, 59, 58, tzinfo=timezone.utc)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: frozen)
    monkeypatch.setattr("etl.store.time.gmtime", lambda: frozen.timetuple())
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    direct = DirectPut(base, "eu-west-1", credentials, pool_size=1, timeout=(1, 1))
    body = jpeg_bytes()
    sha = hashlib.sha256(body).hexdigest()
    for post_id in HOSTILE_IDS:
        encoded = "/" + quote(object_key("arch ive/", "mock", WHEN, post_id, 0, "image/jpeg"), safe="/~")
        ours = direct.signed(direct.path + encoded, {"content-type": "image/jpeg", "if-none-match": "*", "x-amz-meta-sha256": sha}, sha)
        theirs = AWSRequest(method="PUT", url=direct.base + encoded, data=body, headers={
            "Content-Type": "image/jpeg", "If-None-Match": "*", "x-amz-meta-sha256": sha,
            "X-Amz-Security-Token": token, "X-Amz-Content-SHA256": sha,
        } if token else {"Content-Type": "image/jpeg", "If-None-Match": "*", "x-amz-meta-sha256": sha})  # fmt: skip
        S3SigV4Auth(credentials.get_frozen_credentials(), "s3", "eu-west-1").add_auth(theirs)
        assert ours["authorization"] == theirs.headers["Authorization"], post_id
        assert ours["x-amz-date"] == theirs.headers["X-Amz-Date"] and ours.get("x-amz-security-token") == token


@pytest.mark.fault("S3 SlowDown, a 500 and a dropped connection on direct PUTs: boto3 retries those objects")
def test_answers_the_direct_path_does_not_handle_go_to_boto3(endpoint, make_settings):
    proxy, admin, make_store = endpoint
    store, by_boto3 = make_store(make_settings, ETL_RETRY_MAX_WAIT="0.1")
    proxy.plan = lambda method, path, n: (
        (503, "SlowDown", b"") if method == "PUT" and n == 2 else
        (500, "InternalError", b"") if method == "PUT" and n == 4 else
        "drop" if method == "PUT" and n == 6 else None
    )  # fmt: skip
    bodies = put_all(store, [f"p{i}" for i in range(8)])
    assert_stored(admin, bodies)
    assert len(by_boto3) == 4  # the first, and one for each object the direct path could not store
    assert store.direct is not None  # still in use: those were passing troubles


@pytest.mark.parametrize("status", [301, 400, 403])
def test_a_refusal_hands_every_later_put_to_boto3(endpoint, make_settings, status):
    proxy, admin, make_store = endpoint
    store, by_boto3 = make_store(make_settings)
    proxy.plan = lambda method, path, n: (status, "Refused", b"") if method == "PUT" and n == 2 else None
    bodies = put_all(store, [f"r{i}" for i in range(5)])
    assert_stored(admin, bodies)
    assert store.direct is None and len(by_boto3) == 5  # the first, the refused one again, and the rest


def test_an_existing_key_costs_a_head_and_is_replaced_only_by_a_repair(endpoint, make_settings):
    proxy, admin, make_store = endpoint
    admin.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    store, by_boto3 = make_store(make_settings)
    put_all(store, ["learn"])
    body = png_bytes()
    sha = hashlib.sha256(body).hexdigest()
    assert store.put("k/0.png", body, "image/png", sha) is True
    heads = proxy.counts.get("HEAD", 0)
    assert store.put("k/0.png", body, "image/png", sha) is False  # 412 from If-None-Match, then one HEAD
    assert proxy.counts["HEAD"] == heads + 1
    other = png_bytes(color=(1, 2, 3))
    with pytest.raises(KeyHeld):  # other bytes: another run's, kept
        store.put("k/0.png", other, "image/png", hashlib.sha256(other).hexdigest())
    assert admin.get_object(Bucket=BUCKET, Key="k/0.png")["Body"].read() == body
    assert store.put("k/0.png", other, "image/png", hashlib.sha256(other).hexdigest(), replace=True) is True
    versions = admin.list_object_versions(Bucket=BUCKET, Prefix="k/0.png")["Versions"]
    assert len(versions) == 2 and admin.get_object(Bucket=BUCKET, Key="k/0.png")["Body"].read() == other
    assert len(by_boto3) == 2  # the first PUT, and the replacement (an unconditional PUT is boto3's)


def test_s3_direct_put_false_leaves_every_put_to_boto3(endpoint, make_settings):
    _, admin, make_store = endpoint
    store, by_boto3 = make_store(make_settings, S3_DIRECT_PUT="false")
    bodies = put_all(store, ["a", "b", "c"])
    assert store.direct is None and len(by_boto3) == 3
    assert_stored(admin, bodies)


AUTH = "AWS4-HMAC-SHA256 Credential=AKID/20261121/eu-west-1/s3/aws4_request, SignedHeaders=host, Signature=ab"


@pytest.mark.parametrize(
    ("url", "authorization", "why"),
    [
        ("https://b.s3.eu-west-1.amazonaws.com/k/0.png", "AWS AKID:c2lnbmF0dXJl", "signature version 2"),
        ("https://b.s3.eu-west-1.amazonaws.com/k/0.png", None, "unsigned"),
        ("https://b.s3.eu-west-1.amazonaws.com/k/0.png?x-id=PutObject", AUTH, "a query string"),
        ("https://b.s3.eu-west-1.amazonaws.com/other/0.png", AUTH, "not the key's URL"),
        (None, AUTH, "no request seen"),
    ],
)
def test_no_direct_path_from_a_request_it_cannot_reproduce(make_settings, monkeypatch, url, authorization, why):
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    credentials = Credentials("AKID", "secret")
    assert DirectPut.learned(url, authorization, "k/0.png", credentials, make_settings()) is None, why


def test_the_direct_path_learns_virtual_hosted_urls_and_the_region(make_settings, monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = "https://b.s3.eu-west-1.amazonaws.com/arch%20ive/k/0.png"
    direct = DirectPut.learned(url, AUTH.encode(), "arch ive/k/0.png", Credentials("AKID", "s"), make_settings())
    assert direct is not None
    assert (direct.base, direct.region) == ("https://b.s3.eu-west-1.amazonaws.com", "eu-west-1")


def test_no_direct_path_behind_a_proxy(make_settings, monkeypatch):
    url = "https://b.s3.eu-west-1.amazonaws.com/k/0.png"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert DirectPut.learned(url, AUTH, "k/0.png", Credentials("AKID", "s"), make_settings()) is None
    monkeypatch.setenv("NO_PROXY", ".amazonaws.com")  # the proxy does not apply to this endpoint
    assert DirectPut.learned(url, AUTH, "k/0.png", Credentials("AKID", "s"), make_settings()) is not None
