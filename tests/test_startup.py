"""Start-up cost (issue 16): a command imports only what it uses, so a rerun with nothing new stays cheap."""

from __future__ import annotations

import json

from tests.support import MODULES_AT_EXIT, imported, write_posts

# What each one is for; a rerun of a file into the local store, with nothing new, needs none of them.
HEAVY = {
    "boto3": "the S3 store", "botocore": "the S3 store",
    "PIL": "checking a downloaded image", "numpy": "language detection", "py3langid": "language detection",
    "etl.fastscore": "scoring a caption", "textblob": "scoring a caption", "nltk": "scoring a caption",
    "googleapiclient": "the youtube source", "matplotlib": "the report", "pyarrow": "the export", "duckdb": "the export",
    "prometheus_client": "the metrics file", "tenacity": "retrying a request", "tqdm": "the live progress line",
    "multiprocessing": "re-enrichment's process pool", "etl.reenrich": "re-enrichment", "etl.verify": "fixity checks",
    "etl.forget": "deletions", "etl.export": "the export", "etl.report": "the report",
    "requests": "an HTTP request (etl/lazy.py)", "urllib3": "an HTTP request (etl/lazy.py)",
    "http.client": "an HTTP request", "http.server": "the mock source's image server",
}  # fmt: skip


def heavy_in(modules: set[str]) -> dict[str, str]:
    return {m: why for m, why in HEAVY.items() if m in modules or any(n.startswith(m + ".") for n in modules)}


# What a rerun of a file with nothing new used to import at start-up and must not again (issue 16, round two).
NOT_AT_START = {
    "argparse": "reading the command line (a plain run is read by etl/cli_args.py)", "gettext": "argparse's messages",
    "ssl": "HTTPS (psycopg2 imports it only for OpenSSL before 1.1; etl/db/__init__.py)",
    "importlib.metadata": "package versions (etl/versions.py reads them)", "email": "importlib.metadata's header parser",
    "pgserver": "the embedded PostgreSQL (DATABASE_URL is set)", "difflib": "suggesting a misspelled setting",
    "uuid": "check's test object", "etl.trends": "`trends`", "etl.sources.api": "the HTTP platforms' common layer",
    **{f"etl.sources.{name}": "another platform" for name in ("bluesky", "instagram", "mastodon", "mock", "reddit", "twitter", "youtube")},
}  # fmt: skip


def test_a_rerun_with_nothing_new_imports_nothing_it_does_not_use(run_etl, http_server, db, tmp_path):
    posts = write_posts(tmp_path / "posts.jsonl", http_server, 3)
    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true"}
    args = ("run", "--source", "jsonl", "--input", str(posts))
    first = run_etl(*args, env=env, wrapper=("-c", MODULES_AT_EXIT))
    assert first.returncode == 0, first.stderr
    # The first run did fetch, check and score: the names below are what a run that does it imports.
    assert {"PIL", "py3langid", "numpy", "etl.fastscore", "requests", "urllib3"} <= imported(first)
    served = len(http_server.requests)

    rerun = run_etl(*args, env=env, wrapper=("-c", MODULES_AT_EXIT))
    assert rerun.returncode == 0, rerun.stderr
    assert len(http_server.requests) == served  # nothing new: not one image request
    assert heavy_in(imported(rerun)) == {}
    assert {m: why for m, why in NOT_AT_START.items() if m in imported(rerun)} == {}
    assert "etl.sources.jsonl" in imported(rerun)  # (the rule above would hold of a run that did nothing)


def test_help_and_status_import_neither_the_archiver_nor_its_downloader(run_etl):
    result = run_etl("--help", wrapper=("-c", MODULES_AT_EXIT))
    assert result.returncode == 0 and "commands:" in result.stdout
    modules = imported(result)
    assert not {"etl.run.runner", "etl.run.archiver", "etl.media", "etl.enrich"} & modules
    assert heavy_in(modules) == {}


def test_this_check_sees_an_import_when_there_is_one(run_etl):
    """The wrapper reports what the child imported (so the two tests above cannot pass by reporting nothing)."""
    result = run_etl("--version", wrapper=("-c", "import prometheus_client\n" + MODULES_AT_EXIT))
    assert "prometheus_client" in heavy_in(imported(result))


def _one_post(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text('{"platform": "fixture", "post_id": "1", "caption": "a fine day", "created_at": "2026-10-01T12:00:00Z"}\n')
    return path


def test_a_platform_is_imported_when_its_settings_are_set_and_their_errors_still_stop_a_run(run_etl, tmp_path):
    """A run of one source imports another platform only when the environment holds that platform's variables
    (YOUTUBE_...), so a bad value of any platform still stops every run before any work, as it always did."""
    posts = _one_post(tmp_path)
    args = ("run", "--source", "jsonl", "--input", str(posts))
    named = run_etl(*args, env={"YOUTUBE_QUERY": "cats"}, wrapper=("-c", MODULES_AT_EXIT))
    assert named.returncode == 0, named.stderr
    platforms = {m for m in imported(named) if m.startswith("etl.sources.") and m not in ("etl.sources.base", "etl.sources.api")}
    assert platforms == {"etl.sources.jsonl", "etl.sources.youtube"}

    bad = run_etl(*args, env={"TWITTER_MAX_WAIT": "soon"})
    assert bad.returncode == 2 and "TWITTER_MAX_WAIT='soon' is invalid" in bad.stderr


def test_a_misspelled_platform_setting_is_still_named_on_a_run_of_another_source(run_etl, tmp_path):
    posts = _one_post(tmp_path)
    result = run_etl("run", "--source", "jsonl", "--input", str(posts), env={"ETL_MASTODON_INSTANCE": "x", "REDIT_SUBREDDITS": "y"})
    assert result.returncode == 0, result.stderr
    assert "ETL_MASTODON_INSTANCE is not a setting of ours (ignored); did you mean MASTODON_INSTANCE?" in result.stderr


def test_every_platform_is_named_after_its_module_and_its_settings_after_it():
    """What lets a run import only the platforms it needs: `youtube` lives in etl/sources/youtube.py and every
    setting it declares starts with YOUTUBE_ (else a value of it could go unchecked, unimported)."""
    from etl.sources import BUILT_IN, REGISTRY, declared_settings

    # Listing the registry imports every platform (other tests may have registered sources of their own).
    assert sorted(n for n, cls in REGISTRY.items() if cls.__module__.startswith("etl.sources.")) == list(BUILT_IN)
    for name in BUILT_IN:
        assert REGISTRY[name].__module__ == f"etl.sources.{name}"
        assert all(s.env.startswith(f"{name.upper()}_") for s in declared_settings()[name]), name


def test_the_platforms_are_the_modules_pkgutil_finds(tmp_path):
    """Listed as pkgutil.iter_modules lists them, a module kept as bytecode or compiled code included."""
    import pkgutil

    from etl.sources import _SHARED, BUILT_IN, _module_names
    from etl.sources import __path__ as folder

    assert list(BUILT_IN) == sorted(m.name for m in pkgutil.iter_modules(folder) if m.name not in _SHARED)
    for name in ("plain.py", "only_bytecode.pyc", "compiled.cpython-311-x86_64-linux-gnu.so", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert _module_names(str(tmp_path)) == {m.name for m in pkgutil.iter_modules([str(tmp_path)])}


def test_a_package_in_a_zip_on_the_path_is_left_to_importlib_metadata(tmp_path, monkeypatch):
    """A zip on sys.path before site-packages (a zipapp): importlib.metadata reads it, so its version wins."""
    import importlib.metadata
    import zipfile

    from etl.versions import version

    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("textblob-0.0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: textblob\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(archive))
    assert importlib.metadata.version("textblob") == "0.0.1"
    assert version("textblob") == "0.0.1"


def test_package_versions_are_the_ones_importlib_metadata_gives():
    import importlib.metadata

    import pytest

    from etl.versions import version

    names = {dist.metadata["Name"] for dist in importlib.metadata.distributions()}
    assert {"textblob", "py3langid", "psycopg2-binary"} <= names
    assert {name: version(name) for name in names} == {name: importlib.metadata.version(name) for name in names}
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        version("no-such-package-of-ours")


def test_psycopg2_without_ssl_at_start_still_connects_and_ssl_still_loads_later(db):
    """etl.db imports psycopg2 without Python's ssl module; a connection works, and so does ssl when HTTPS needs it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import sys, etl.db\n"
        "assert 'ssl' not in sys.modules, 'ssl was imported'\n"
        "conn = etl.db.Database(sys.argv[1], display='test').connect()\n"
        "import ssl, requests\n"
        "ssl.create_default_context()\n"
        "print('ok', conn.server_version > 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, db.dsn], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0 and result.stdout.split() == ["ok", "True"], result.stderr


def test_package_names_are_normalized_as_importlib_metadata_does():
    import random
    import re

    from etl.versions import _normalized

    rng = random.Random(16)
    for _ in range(5000):
        name = "".join(rng.choice("aZ9-_.İ") for _ in range(rng.randint(0, 9)))
        assert _normalized(name) == re.sub(r"[-_.]+", "-", name).lower().replace("-", "_"), name


def test_what_start_up_loads_is_kept_out_of_garbage_collections(run_etl):
    """etl.py freezes the objects its modules made (gc.freeze): no collection walks them again."""
    wrapper = MODULES_AT_EXIT.replace('print("modules-at-exit:"', 'import gc; print("frozen:", gc.get_freeze_count(), file=sys.stderr)\n    print("modules-at-exit:"')
    result = run_etl("--version", wrapper=("-c", wrapper))
    frozen = next(line for line in result.stderr.splitlines() if line.startswith("frozen: "))
    assert int(frozen.split()[1]) > 10_000, frozen


# Runs etl.py and reports the young generation's collections once the package `etl` is loaded (etl.py has set the
# collector up by then), and then those that 120,000 objects in cycles, made after the run, set off.
COLLECTIONS_AT_EXIT = """
import gc, runpy, sys
sys.argv = sys.argv[1:]
during = []
gc.callbacks.append(lambda phase, info: during.append(1) if phase == "start" and info["generation"] == 0 and "etl" in sys.modules else None)
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    ran = len(during)
    class Cycle:
        pass
    for _ in range(120_000):
        c = Cycle()
        c.me = c
    del c
    print("collections:", ran, len(during) - ran, file=sys.stderr, flush=True)
"""


def test_a_run_of_batches_leaves_the_collector_idle_and_garbage_in_cycles_still_collected(run_etl, tmp_path):
    """etl.py raises the young generation's threshold: a run of 6,000 posts (four batches, thousands of containers
    each) makes a handful of collections at most (one here; 111 at the default threshold); garbage in cycles still sets one off
    (none with the collector disabled)."""
    path = tmp_path / "posts.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(6000):
            post = {"platform": "fixture", "post_id": f"p{i}", "caption": f"post {i} #tag{i % 50} is fine",
                    "created_at": "2026-10-01T12:00:00Z", "like_count": i, "raw": {"id": i, "tags": [i, {"n": i}]}}
            f.write(json.dumps(post) + "\n")
    result = run_etl("run", "--source", "jsonl", "--input", str(path), wrapper=("-c", COLLECTIONS_AT_EXIT))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("collections: "))
    during, after = map(int, line.split()[1:])
    assert during <= 5, line  # how many batches are alive at once varies with the loads' pace
    assert after >= 1, line
