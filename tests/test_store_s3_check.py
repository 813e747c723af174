"""The S3 bucket check without boto3 (issue 16): a HEAD signed here, boto3 asked only when that is not a plain 200.

moto's server runs over real HTTP behind the fault proxy, with its signature checks on (an IAM user's key), so a
HEAD signed wrongly is refused rather than waved through.
"""

from __future__ import annotations

import hashlib
import logging
import os

import boto3
import pytest

from etl.errors import ConfigError
from etl.store import S3Store, answered_bucket, plain_bucket_url
from tests.support import BUCKET, MODULES_AT_EXIT, iam_user_key, imported, s3_env, stored_keys, write_posts

BORROWED = ("boto3", "botocore", "s3transfer")


@pytest.fixture
def signed_moto(moto_s3, monkeypatch, tmp_path):
    """(proxy, admin client, env): moto checking every signature; env reaches it through the proxy with a valid key."""
    proxy, client = moto_s3
    access_key, secret = iam_user_key(client.meta.endpoint_url)
    from moto import settings as moto_settings

    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # from now on, every request is checked
    admin = boto3.client(
        "s3", endpoint_url=client.meta.endpoint_url, region_name="us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret,
    )  # fmt: skip
    for name in list(os.environ):  # the developer's own AWS set-up and proxies: not this test's
        if name.startswith("AWS_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    env = s3_env(proxy, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret)
    env["AWS_CONFIG_FILE"] = str(tmp_path / "no-aws-config")  # not the developer's ~/.aws/config
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-aws-credentials")  # nor ~/.aws/credentials
    return proxy, admin, env


def settings_of(make_settings, env: dict[str, str]):
    return make_settings(**{k: v for k, v in env.items() if not k.startswith("AWS_") or k == "AWS_REGION"})


def checked_store(signed_moto, make_settings, monkeypatch, **extra: str) -> tuple:
    """(proxy, admin client, env, store): the environment set as a run has it, and an S3Store whose check ran."""
    proxy, client, env = signed_moto
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = S3Store(settings_of(make_settings, {**env, **extra}))
    store.check()
    return proxy, client, env, store


def test_the_head_signed_here_is_one_moto_accepts(signed_moto, make_settings):
    proxy, _, env = signed_moto
    settings = settings_of(make_settings, env)
    answered = answered_bucket(settings, env)
    assert answered is not None and answered[0] == f"{env['AWS_ENDPOINT_URL'].rstrip('/')}/{env['S3_BUCKET']}"
    assert proxy.forwarded == {"HEAD": 1}  # moto itself answered: no injected reply, no boto3 call
    assert answered_bucket(settings, {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}) is None  # the check can fail
    assert answered_bucket(settings_of(make_settings, {**env, "S3_BUCKET": "no-such-bucket"}), env) is None


def test_a_check_answered_200_makes_no_boto3_client(signed_moto, make_settings, monkeypatch):
    proxy, _, env, store = checked_store(signed_moto, make_settings, monkeypatch)
    assert store._client is None and proxy.counts == {"HEAD": 1}


@pytest.mark.fault("a PUT signed here after a plain check is refused (403): boto3 sends it, and every later one")
def test_a_refused_put_after_a_plain_check_hands_the_rest_to_boto3(signed_moto, make_settings, monkeypatch):
    proxy, client, env, store = checked_store(signed_moto, make_settings, monkeypatch)
    assert store.direct is not None and store._client is None  # the check's URL and keys: the direct path's
    proxy.plan = lambda method, path, n: (403, "AccessDenied", b"") if (method, n) == ("PUT", 1) else None
    for n in range(3):
        body = f"image {n}".encode()
        assert store.put(f"k/{n}.png", body, "image/png", hashlib.sha256(body).hexdigest()) is True
    assert store.direct is None and store._client is not None  # boto3 from then on, nothing learned from it
    assert proxy.counts == {"HEAD": 1, "PUT": 4}  # the refused PUT, then boto3's three
    assert set(stored_keys(client)) == {"k/0.png", "k/1.png", "k/2.png"}


@pytest.mark.fault("a stored object failed its fixity check: put(replace=True) overwrites it, past the direct path")
def test_a_replacing_put_after_a_plain_check_overwrites_the_object(signed_moto, make_settings, monkeypatch):
    proxy, client, env, store = checked_store(signed_moto, make_settings, monkeypatch)
    good = b"the image as fetched"
    digest = hashlib.sha256(good).hexdigest()
    assert store.put("k/0.png", good, "image/png", digest) is True
    # Damaged in the bucket (same length), its metadata still naming the right SHA-256: a conditional PUT would keep
    # it (412, then a HEAD that finds nothing wrong).
    damaged = b"x" * len(good)
    client.put_object(Bucket=env["S3_BUCKET"], Key="k/0.png", Body=damaged, Metadata={"sha256": digest})
    assert store.put("k/0.png", good, "image/png", digest, replace=True) is True
    assert client.get_object(Bucket=env["S3_BUCKET"], Key="k/0.png")["Body"].read() == good


@pytest.mark.fault("the keys of a direct PUT cannot be refreshed (an expired SSO token): a StoreError naming the key")
def test_keys_that_cannot_be_refreshed_fail_the_put_as_a_store_error(signed_moto, make_settings, monkeypatch):
    from botocore.exceptions import CredentialRetrievalError

    from etl.errors import StoreError

    proxy, client, env, store = checked_store(signed_moto, make_settings, monkeypatch)

    class Expired:
        def get_frozen_credentials(self):
            raise CredentialRetrievalError(provider="sso", error_msg="the token has expired")

    store.direct.credentials = Expired()
    with pytest.raises(StoreError, match="S3 PUT k/0.png failed: .*the token has expired"):
        store.put("k/0.png", b"an image", "image/png", hashlib.sha256(b"an image").hexdigest())


def test_s3_direct_put_false_leaves_every_put_to_boto3_after_a_plain_check(signed_moto, make_settings, monkeypatch):
    proxy, client, env, store = checked_store(signed_moto, make_settings, monkeypatch, S3_DIRECT_PUT="false")
    assert store.direct is None and store._client is None  # the check still needs no boto3
    body = b"an image"
    assert store.put("k/0.png", body, "image/png", hashlib.sha256(body).hexdigest()) is True
    assert store.direct is None and store._client is not None and proxy.counts == {"HEAD": 1, "PUT": 1}


@pytest.mark.fault("the HEAD signed here gets a 500, a 301 or a dropped connection: boto3 asks again and decides")
@pytest.mark.parametrize("answer", [(500, "InternalError", b""), (301, "PermanentRedirect", b""), "drop"])
def test_anything_but_200_hands_the_check_to_boto3(signed_moto, make_settings, monkeypatch, answer):
    proxy, _, env = signed_moto
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    proxy.plan = lambda method, path, n: answer if (method, n) == ("HEAD", 1) else None
    store = S3Store(settings_of(make_settings, env))
    store.check()  # boto3's own HEAD (the second) reached moto and passed
    assert store._client is not None and proxy.counts == {"HEAD": 2} and proxy.forwarded == {"HEAD": 1}


@pytest.mark.badinput("a wrong secret key: the signed HEAD is refused, boto3 words it as before, the secret unseen")
def test_wrong_credentials_give_todays_message(signed_moto, make_settings, monkeypatch, caplog):
    proxy, _, env = signed_moto
    env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-key-1234"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    denied = r"S3_BUCKET 'archive-test': access denied \(check the AWS credentials"
    with pytest.raises(ConfigError, match=denied) as exc:
        S3Store(settings_of(make_settings, env)).check()
    assert proxy.counts == {"HEAD": 2}  # ours, then boto3's
    assert "wrong-secret-key-1234" not in str(exc.value) + caplog.text


def test_neither_a_first_run_nor_a_rerun_imports_boto3_in_a_plain_setup(signed_moto, run_etl, http_server, db, tmp_path):
    """The check's HEAD, signed here, answered 200: every PUT of a first run is signed the same way and accepted by
    moto (its signature checks on), with the image's sha256 recorded; a rerun with every image held sends none."""
    proxy, client, env = signed_moto
    posts = write_posts(tmp_path / "posts.jsonl", http_server, 4)
    args = ("run", "--source", "jsonl", "--input", str(posts))
    first = run_etl(*args, env=env, wrapper=("-c", MODULES_AT_EXIT))
    assert first.returncode == 0, first.stderr
    keys = stored_keys(client)
    assert len(keys) == 4 and proxy.counts == {"HEAD": 1, "PUT": 4}  # no PUT sent twice, no boto3 HEAD
    for key in keys:
        head = client.head_object(Bucket=env["S3_BUCKET"], Key=key)
        body = client.get_object(Bucket=env["S3_BUCKET"], Key=key)["Body"].read()
        assert head["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert not {m for m in imported(first) if m.partition(".")[0] in BORROWED}
    puts, heads = proxy.counts.get("PUT", 0), proxy.counts.get("HEAD", 0)

    # The keys from .env this time (python-dotenv hands them to boto3 through os.environ): still a plain set-up.
    keys = {name: env.pop(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    (tmp_path / ".env").write_text("".join(f"{name}={value}\n" for name, value in keys.items()))
    rerun = run_etl(*args, env=env, wrapper=("-c", MODULES_AT_EXIT))
    assert rerun.returncode == 0, rerun.stderr
    assert keys["AWS_SECRET_ACCESS_KEY"] not in rerun.stderr + rerun.stdout
    assert not {m for m in imported(rerun) if m.partition(".")[0] in BORROWED}
    assert proxy.counts.get("PUT", 0) == puts and proxy.counts["HEAD"] == heads + 1  # the bucket was checked, once


@pytest.mark.fault("S3_BUCKET names a bucket that is not there: still exit 2 with today's message, boto3 asked")
def test_a_wrong_bucket_still_exits_2_with_todays_message(signed_moto, run_etl, db):
    proxy, _, env = signed_moto
    result = run_etl("run", "--source", "mock", env={**env, "S3_BUCKET": "no-such-bucket"})
    assert result.returncode == 2
    assert "S3_BUCKET 'no-such-bucket' does not exist" in result.stderr
    assert proxy.counts == {"HEAD": 2}  # the HEAD signed here found nothing; boto3 asked and worded it


@pytest.mark.parametrize(
    "extra",
    [
        {"AWS_PROFILE": "work"},  # a profile's keys: boto3's to find
        {"AWS_ENDPOINT_URL_S3": "http://elsewhere:9000"},  # another endpoint for S3 only
        {"AWS_USE_FIPS_ENDPOINT": "true"},
        {"AWS_SECURITY_TOKEN": "old-name-token"},
        {"HTTPS_PROXY": "http://proxy:3128"},  # boto3 would go through it
        {"http_proxy": "http://proxy:3128"},
        {"AWS_ACCESS_KEY_ID": ""},  # no keys in the environment: SSO, instance roles, ...
        {"AWS_ENDPOINT_URL": ""},  # AWS itself: its URL rules are boto3's
        {"AWS_ENDPOINT_URL": "http://host:9000/under/a/path"},
        {"AWS_ENDPOINT_URL": "ftp://host"},
        {"AWS_ENDPOINT_URL": "http://host:port"},
        {"AWS_ENDPOINT_URL": "http://user:pw@host:9000"},
        {"AWS_REGION": ""},  # the region would come from boto3's chain
        {"AWS_REGION": "eu_west_1"},  # botocore refuses the name (an endpoint like MinIO may accept any region)
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000\n"},  # urlsplit drops the newline, botocore refuses it
        {"AWS_PROFILE": ""},  # empty, yet boto3 refuses it (ProfileNotFound): .env.example has "# AWS_PROFILE="
        {"AWS_REQUEST_CHECKSUM_CALCULATION": ""},  # empty and invalid for boto3
        {"AWS_MAX_ATTEMPTS": "many"},
        {"AWS_RETRY_MODE": ""},
        {"S3_BUCKET": "Upper_Case"},  # not an S3 name: botocore refuses it before sending
    ],
)
def test_anything_but_a_plain_setup_is_left_to_boto3(make_settings, tmp_path, extra):
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_CONFIG_FILE": str(tmp_path / "none"), "S3_BUCKET": "b-1",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }  # fmt: skip
    assert plain_bucket_url(settings_of(make_settings, env), env)[0] == "http://127.0.0.1:9000/b-1"
    env.update(extra)
    assert plain_bucket_url(settings_of(make_settings, env), env) is None


@pytest.mark.parametrize(
    ("config", "plain"),
    [
        ("[default]\nregion = eu-west-1\noutput = json\n[profile other]\ns3 =\n  addressing_style = virtual\n", True),
        ("[default]\nregion = eu-west-1\ns3 =\n  addressing_style = virtual\n", False),
        ("[default]\nca_bundle = /etc/private-ca.pem\n", False),
        ("[profile default]\nendpoint_url = http://other:9000\n", False),
        ("[default\nregion = broken", False),
    ],
)
def test_a_config_file_saying_more_than_a_region_is_left_to_boto3(make_settings, tmp_path, config, plain):
    (tmp_path / "config").write_text(config)
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "https://s3.example:8443/", "AWS_CONFIG_FILE": str(tmp_path / "config"), "S3_BUCKET": "b.1",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }  # fmt: skip
    found = plain_bucket_url(settings_of(make_settings, env), env)
    assert (found[0] if found else None) == ("https://s3.example:8443/b.1" if plain else None)


def test_the_keys_never_reach_a_log_line_or_a_repr(make_settings, caplog, tmp_path):
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "very-secret-value", "AWS_SESSION_TOKEN": "tok-secret",
        "AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "S3_BUCKET": "b-1", "ETL_CONNECT_TIMEOUT": "1",
    }  # fmt: skip
    caplog.set_level(logging.DEBUG)
    assert answered_bucket(settings_of(make_settings, env), env) is None  # nothing listens on port 9
    assert "HEAD of the bucket signed here" in caplog.text
    url, credentials = plain_bucket_url(settings_of(make_settings, env), env)
    shown = caplog.text + url + repr(credentials)
    assert "very-secret-value" not in shown and "tok-secret" not in shown


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE//token+with/slashes=="])
@pytest.mark.parametrize("base", ["http://127.0.0.1:9000/b-1", "https://s3.example:8443/b.1", "http://[::1]:9000/b"])
def test_the_head_is_signed_as_botocore_signs_it(monkeypatch, base, token):
    """The HEAD's SigV4 signature, byte for byte botocore's S3 signer's for the same request (the PUT's own test is
    in test_s3_direct): the same signer, with the method in the canonical request."""
    from datetime import datetime, timezone

    import botocore.auth
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from etl.store import EMPTY_SHA256, SigV4

    frozen = datetime(2026, 11, 30, 23, 59, 58, tzinfo=timezone.utc)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: frozen)
    monkeypatch.setattr("etl.store.time.gmtime", lambda: frozen.timetuple())
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    signer = SigV4(base, "eu-west-1", credentials)
    ours = signer.signed(signer.path, {}, EMPTY_SHA256, "HEAD")
    theirs = AWSRequest(method="HEAD", url=base, headers={"X-Amz-Security-Token": token} if token else {})
    S3SigV4Auth(credentials.get_frozen_credentials(), "s3", "eu-west-1").add_auth(theirs)
    assert ours["authorization"] == theirs.headers["Authorization"]
    assert ours["x-amz-content-sha256"] == theirs.headers["X-Amz-Content-SHA256"]


@pytest.mark.parametrize(
    ("credentials", "plain"),
    [
        ("[default]\naws_access_key_id = AKIDOTHER\naws_secret_access_key = s\nregion = eu-west-1\n", True),
        ("[default]\naws_access_key_id = AKIDOTHER\ns3 =\n  addressing_style = virtual\n", False),  # merged by botocore
        ("[profile default]\nendpoint_url = http://other:9000\n", False),
    ],
)
def test_a_credentials_file_saying_more_than_keys_is_left_to_boto3(make_settings, tmp_path, credentials, plain):
    (tmp_path / "credentials").write_text(credentials)
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "S3_BUCKET": "b-1",
    }  # fmt: skip
    found = plain_bucket_url(settings_of(make_settings, env), env)
    assert (found[0] if found else None) == ("http://127.0.0.1:9000/b-1" if plain else None)


def _readme_policy(bucket: str, prefix: str) -> dict:
    """The least-privilege IAM policy README's Security section gives, for `bucket` and `prefix` (it says
    my-archive and social/)."""
    import json
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    after = text[text.index("A least-privilege IAM policy for the archiver") :]
    block = re.search(r"```json\n(.*?)```", after, re.S).group(1)
    return json.loads(block.replace("my-archive", bucket).replace("social/", prefix))


def test_the_readme_policy_allows_every_command(moto_s3, run_etl, http_server, db, tmp_path, monkeypatch):
    """A moto IAM user holding exactly README's policy runs check, a run with images, verify, forget and export.
    moto checks each request's action and resource (not conditions). The policy as it was (DeleteObject under
    export/ only) refused forget; this test refuses it too."""
    import json

    from moto import settings as moto_settings

    proxy, admin = moto_s3
    iam = boto3.client("iam", endpoint_url=admin.meta.endpoint_url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    iam.create_user(UserName="archiver")
    policy = _readme_policy(BUCKET, "archive/")
    # moto authorises a HEAD of the bucket as "s3:HeadBucket", which is no IAM action; AWS asks s3:ListBucket for it
    moto_only = {"Effect": "Allow", "Action": "s3:HeadBucket", "Resource": f"arn:aws:s3:::{BUCKET}"}
    policy["Statement"].append(moto_only)
    iam.put_user_policy(UserName="archiver", PolicyName="readme", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="archiver")["AccessKey"]
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # every request checked from now on
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    env = s3_env(proxy, AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"], ETL_SOURCES="mock",
                 AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))  # fmt: skip
    posts = write_posts(tmp_path / "posts.jsonl", http_server, 3)
    for args in (("check",), ("run", "--source", "jsonl", "--input", str(posts)), ("verify",),
                 ("forget", "--post", "fixture:p0"), ("export",)):  # fmt: skip
        done = run_etl(*args, env=env)
        assert done.returncode == 0, (args, done.stdout + done.stderr[-3000:])
    archiver = boto3.client("s3", endpoint_url=admin.meta.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])  # fmt: skip
    images = [k for k in stored_keys(archiver) if not k.startswith("archive/export/")]
    assert sorted(k.rsplit("/", 2)[-2] for k in images) == ["p1", "p2"]  # p0 forgotten, its image deleted

    old = json.loads(json.dumps(policy))  # the policy before: DeleteObject under export/ only
    old["Statement"][0]["Action"] = ["s3:PutObject", "s3:GetObject"]
    old["Statement"].append({"Effect": "Allow", "Action": ["s3:DeleteObject"], "Resource": f"arn:aws:s3:::{BUCKET}/archive/export/*"})
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))  # the admin's change
    iam.put_user_policy(UserName="archiver", PolicyName="readme", PolicyDocument=json.dumps(old))
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    refused = run_etl("forget", "--post", "fixture:p1", env=env)
    assert refused.returncode != 0 and "AccessDenied" in refused.stdout + refused.stderr
