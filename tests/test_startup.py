"""Start-up cost (issue 16): a command imports only what it uses, so a rerun with nothing new stays cheap."""

from __future__ import annotations

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
