"""Reddit: r/analog/new against a local fake of the token endpoint and the OAuth API."""

from __future__ import annotations

import json
import time

import pytest

from etl.sources.base import FetchWindow
from etl.sources.reddit import RedditSource, thing_to_post
from tests.conftest import query
from tests.platform_reddit import AGENT, FIXTURES, IDS, NEW, SECRET, TOKEN_PATH, FakeReddit, reddit_env
from tests.support import assert_refused_cleanly, stored_objects, stream_states


def source_for(make_settings, server, tmp_path, **extra):
    env = reddit_env(server, tmp_path, **extra)
    env.pop("ETL_DATA_DIR")
    return RedditSource(make_settings(**env))


def test_gallery_in_its_order_direct_image_and_preview():
    children = json.loads((FIXTURES / "new_page1.json").read_text())["data"]["children"]
    gallery, direct, link = (thing_to_post(c) for c in children)
    # gallery_data's order (c3kq2, a9xk1, b7tz0), not media_metadata's
    assert [u.split("/")[-1].split(".")[0] for u in gallery.image_urls] == ["c3kq2", "a9xk1", "b7tz0"]
    assert "&amp;" not in gallery.image_urls[0]
    assert direct.image_urls == ("https://i.redd.it/pentax01.jpeg",)
    assert link.image_urls == ("https://external-preview.redd.it/scan.jpg?auto=webp&s=def",)
    assert link.like_count == 0 and link.raw["score"] == -2  # a negative score is no like count


def test_a_crosspost_of_a_gallery_keeps_the_galleries_images():
    # A crosspost's own data has no gallery_data, media_metadata or preview: its url is the shared post's gallery
    # page, and the media are in crosspost_parent_list[0] (the shape gallery-dl and redlib had to learn).
    children = json.loads((FIXTURES / "new_page1.json").read_text())["data"]["children"]
    parent = children[0]["data"]
    crosspost = {
        "id": "1h9zq7c", "title": "x-post: " + parent["title"], "author": "someone_else", "created_utc": parent["created_utc"] + 600,
        "permalink": "/r/analog/comments/1h9zq7c/xpost/", "url": f"https://www.reddit.com/gallery/{parent['id']}",
        "url_overridden_by_dest": f"https://www.reddit.com/gallery/{parent['id']}", "is_gallery": True,
        "crosspost_parent": parent["name"], "crosspost_parent_list": [parent], "score": 3, "num_comments": 0,
    }  # fmt: skip
    shared = thing_to_post({"kind": "t3", "data": crosspost})
    assert shared.image_urls == thing_to_post(children[0]).image_urls and len(shared.image_urls) == 3
    # A crosspost with an image of its own keeps its own; one of a text post has none.
    own = {**crosspost, "preview": {"images": [{"source": {"url": "https://preview.redd.it/own.jpg?s=1"}}]}}
    assert thing_to_post({"kind": "t3", "data": own}).image_urls == ("https://preview.redd.it/own.jpg?s=1",)
    text = {**crosspost, "url": "https://www.reddit.com/r/analog/comments/1/t/", "crosspost_parent_list": [{"id": "1", "selftext": "words"}]}
    del text["url_overridden_by_dest"]
    assert thing_to_post({"kind": "t3", "data": text}).image_urls == ()


def self_post() -> dict:
    # A text post with images uploaded into it (Reddit's rich editor) as /r/{sub}/new?raw_json=1 lists it: the
    # captured t3 of r/comics in github.com/josephrcox/easy-reddit-downloader/issues/95, media_metadata as in
    # github.com/mikf/gallery-dl/issues/2815 (fixtures/reddit/SOURCES).
    return json.loads((FIXTURES / "self_post.json").read_text())


def test_images_uploaded_into_a_text_post_are_archived_in_text_order():
    # No gallery_data, post_hint or preview: the images are only in media_metadata, whose keys come sorted.
    thing = self_post()
    metadata = thing["data"]["media_metadata"]
    first, second = "md10q7a3tzxc1", "2vawyar9tzxc1"  # in the order the text shows them
    assert list(metadata) == [second, first]
    assert thing_to_post(thing).image_urls == (metadata[first]["s"]["u"], metadata[second]["s"]["u"])
    # An id the text does not name goes last; an inline video or a failed upload is no image.
    thing["data"]["media_metadata"] = {
        "0unnamed": {**metadata[first], "s": {"u": "https://preview.redd.it/0unnamed.png?s=u"}},
        "0video": {"status": "valid", "e": "RedditVideo", "dashUrl": "https://v.redd.it/0video/DASHPlaylist.mpd"},
        "1failed": {"status": "failed"},
        # An emote in the text (Reddit's own sticker, e "Image" all the same) is no image of the post.
        "emote|t5_2th52|4511": {"status": "valid", "e": "Image", "m": "image/png", "t": "sticker",
                                "s": {"x": 60, "y": 60, "u": "https://reddit-econ-prod-assets-permanent.s3.amazonaws.com/4511.png"}},
        **metadata,
    }
    assert thing_to_post(thing).image_urls[2:] == ("https://preview.redd.it/0unnamed.png?s=u",)


def test_a_text_posts_caption_keeps_no_character_reference_or_zero_width_paragraph():
    # The rich editor writes an empty paragraph as "&#x200B;"; with raw_json=1 the selftext carries those 8 characters.
    thing = self_post()
    links = [meta["s"]["u"] for meta in thing["data"]["media_metadata"].values()][::-1]  # the text's order
    story = "Day twelve. To my displeasure, they did reveal themselves finally, their swarm appearing behind the hill."
    assert thing_to_post(thing).caption == "\n\n".join(["Baytyrki 1)", links[0], story, links[1]])
    # Numeric references are decoded; a named entity is what the author typed (raw_json=1 unescapes Reddit's own).
    thing["data"]["selftext"] = "Tom &amp; Jerry &#8212; &#X1F44D;\n\n&#x200b;\n\n&#8203;\n\n\n\n  code\n&#0;"
    assert thing_to_post(thing).caption == "Baytyrki 1)\n\nTom &amp; Jerry \u2014 \U0001f44d\n\n  code\n\ufffd"


@pytest.mark.e2e
def test_reddit_run_archives_the_listing_then_rerun_fetches_nothing_twice(run_etl, db, http_server, tmp_path):
    fake = FakeReddit(http_server)
    env = {**reddit_env(http_server, tmp_path), "ETL_SOURCES": "reddit", "ETL_LOG_LEVEL": "DEBUG"}
    result = run_etl("run", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert SECRET not in output and "99.0 requests left" in output
    rows = query(db.dsn, "SELECT post_id, like_count, comment_count, permalink FROM social_posts WHERE platform = 'reddit'")
    assert sorted(r[0] for r in rows) == sorted(IDS)
    media = query(db.dsn, "SELECT post_id, position, status FROM post_media WHERE platform = 'reddit' ORDER BY 1, 2")
    assert [(m[0], m[1]) for m in media if m[0] == IDS[0]] == [(IDS[0], 0), (IDS[0], 1), (IDS[0], 2)]
    assert {m[2] for m in media} == {"stored"} and len(media) == 5
    assert len(stored_objects(tmp_path / "data" / "objects")) == 5
    assert stream_states(db.dsn, "reddit") == {"streams": {"r:analog": {"after": IDS[0]}}}
    assert all(h.get("User-Agent") == AGENT for _, _, h in fake.api_calls("/r/"))

    http_server.requests.clear()
    again = run_etl("run", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    # One token and the first page: the newest post is the saved one, so the stream stops there.
    # The listing is read once more and stops at its saved place; /api/info is the deletions re-check (held posts).
    requests = [p for _, p, _ in http_server.requests]
    assert [p for p in requests if not p.startswith("/api/info")] == [TOKEN_PATH, f"{NEW}?limit=100&raw_json=1"]
    assert "1,000" not in again.stdout + again.stderr


def listing_with_a_deleted_post(fake) -> dict:
    # A post its author deleted stays in the listing as Reddit's placeholders: author and selftext "[deleted]",
    # removed_by_category "deleted" (the shape the re-check reads as gone; the t3 fields of the listing captures in
    # fixtures/reddit/SOURCES). Envelope: new_page1.json (GET /r/{sub}/new?raw_json=1), its newest post deleted.
    page = fake.json("new_page1.json")
    page["data"]["after"] = None
    deleted = page["data"]["children"][0]["data"]
    deleted.update(author="[deleted]", author_fullname=None, selftext="[deleted]", removed_by_category="deleted")
    return page


def test_a_post_deleted_by_its_author_is_reported_gone_not_archived_with_placeholders(make_settings, http_server, tmp_path):
    fake = FakeReddit(http_server)
    fake.overrides[NEW] = [fake.reply(listing_with_a_deleted_post(fake))]
    with source_for(make_settings, http_server, tmp_path) as source:
        ids = [p.post_id for p in source.fetch(FetchWindow())]
    assert ids == IDS[1:3]
    assert source.gone == [("reddit", IDS[0], "removed on Reddit (deleted)")]
    assert source.rejected == 0 and not source.rejects
    assert source.cursor == {"streams": {"r:analog": {"after": IDS[0]}}}  # read past, like any post


@pytest.mark.e2e
def test_a_backfill_meeting_a_deleted_post_keeps_the_archived_one_and_marks_it(run_etl, db, http_server, tmp_path):
    fake = FakeReddit(http_server)
    env = {**reddit_env(http_server, tmp_path), "ETL_SOURCES": "reddit"}
    assert run_etl("run", env=env).returncode == 0
    columns = "SELECT author_username, caption FROM social_posts WHERE platform = 'reddit' AND post_id = %s"
    archived = query(db.dsn, columns, (IDS[0],))
    fake.overrides[NEW] = [fake.reply(listing_with_a_deleted_post(fake))]
    window = ("--since", "2026-03-10", "--until", "2026-03-11")  # one chunk: the day of IDS[0]
    result = run_etl("backfill", "--source", "reddit", *window, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert query(db.dsn, columns, (IDS[0],)) == archived == [("filmfan", "Harbour triptych on Portra 400")]
    assert query(db.dsn, "SELECT post_id FROM social_posts WHERE deleted_at_source IS NOT NULL") == [(IDS[0],)]
    (per_source,) = query(db.dsn, "SELECT per_source FROM etl_runs ORDER BY id DESC LIMIT 1")[0]
    assert per_source["reddit"]["rejected"] == 0


def test_listing_ending_before_the_saved_place_warns_of_the_1000_post_reach(make_settings, http_server, tmp_path, caplog):
    FakeReddit(http_server)
    with source_for(make_settings, http_server, tmp_path) as source:
        ids = [p.post_id for p in source.fetch(FetchWindow(cursor={"streams": {"r:analog": {"after": "1j8a000"}}}))]
    assert ids == IDS
    assert "about the newest 1,000 posts" in caplog.text


@pytest.mark.fault("Reddit app credentials refused (401 on the token): a message naming both settings, secret never shown")
def test_refused_credentials(run_etl, db, http_server, tmp_path):
    FakeReddit(http_server)
    wrong = "wrong-secret-3f9a"
    env = {**reddit_env(http_server, tmp_path, REDDIT_CLIENT_SECRET=wrong), "ETL_SOURCES": "reddit"}
    assert_refused_cleanly(run_etl("run", env=env), db.dsn, wrong, "REDDIT_CLIENT_ID", "REDDIT_CLIENT_SECRET")


@pytest.mark.fault("Reddit 429 with X-Ratelimit-Reset past the allowed wait: the stream ends, the first page kept")
def test_rate_limit_on_the_second_page_keeps_the_first(make_settings, http_server, tmp_path):
    fake = FakeReddit(http_server)
    fake.overrides[NEW] = [
        fake.reply(fake.json("new_page1.json")),
        fake.error("error_429.json", 429, {"X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "420"}),
    ]
    started = time.monotonic()
    with source_for(make_settings, http_server, tmp_path) as source:
        ids = [p.post_id for p in source.fetch(FetchWindow(cursor={"streams": {"r:analog": {"after": "1"}}}))]
    assert time.monotonic() - started < 20
    assert ids == IDS[:3]
    assert "rate limit" in source.rejects[0] and source.cursor == {"streams": {"r:analog": {"after": "1"}}}


@pytest.mark.fault("Reddit token revoked mid-run (401 on the listing): a new token once, then archived")
def test_expired_token_is_renewed_once(make_settings, http_server, tmp_path):
    fake = FakeReddit(http_server)
    fake.overrides[NEW] = [fake.error("error_401.json", 401)]
    with source_for(make_settings, http_server, tmp_path) as source:
        assert [p.post_id for p in source.fetch(FetchWindow())] == IDS
    assert fake.tokens_issued == 2


@pytest.mark.badinput("Reddit listing page without data.children: the stream ends with a clear message")
def test_malformed_listing(make_settings, http_server, tmp_path):
    fake = FakeReddit(http_server)
    fake.overrides[NEW] = [fake.reply({"kind": "Listing", "data": {"after": None}})]
    with source_for(make_settings, http_server, tmp_path) as source:
        assert list(source.fetch(FetchWindow())) == []
    assert "not a Listing" in source.rejects[0] and "r/analog" in source.rejects[0]


# When a moderator approves a spam-filtered post, Reddit lists it at the top of /new "with the current time (moving
# it to the front)" (r/changelog, "[reddit change] Approved links move to the top of the new listing", 2012-04-18),
# with its old id. A read that ended at the first id at or below the saved one lost every post below it.

def approved_t3(pid: str, created: float, title: str) -> dict:
    return {
        "kind": "t3",
        "data": {
            "approved_at_utc": None, "subreddit": "analog", "selftext": "", "title": title, "name": f"t3_{pid}",
            "id": pid, "author": "filmfan", "ups": 5, "score": 5, "num_comments": 0, "created": created,
            "created_utc": created, "is_self": False, "post_hint": "image", "domain": "i.redd.it",
            "url": f"https://i.redd.it/{pid}.jpg", "url_overridden_by_dest": f"https://i.redd.it/{pid}.jpg",
            "permalink": f"/r/analog/comments/{pid}/x/", "stickied": False,
        },
    }  # fmt: skip


APPROVED_SAVED = "1j8c111"  # the newest post the last run read (2026-03-10 08:00 UTC)
AFTER_1 = approved_t3("1j8c112", 1773133200.0, "submitted an hour after the last run")
AFTER_2 = approved_t3("1j8c113", 1773136800.0, "submitted two hours after the last run")
# Submitted five hours before the last run, caught by the spam filter, approved three hours after the last run:
LIFTED = approved_t3("1j8bz00", 1773111600.0, "approved out of the spam filter")
AFTER_3 = approved_t3("1j8c115", 1773144000.0, "submitted after the approval")
HELD = approved_t3(APPROVED_SAVED, 1773129600.0, "archived by the last run")


def test_a_post_approved_out_of_the_spam_filter_on_top_of_new_hides_no_post_below_it(make_settings, http_server, tmp_path, caplog):
    fake = FakeReddit(http_server)
    listing = {"kind": "Listing", "data": {"after": None, "before": None, "dist": 5, "modhash": "",
                                           "children": [AFTER_3, LIFTED, AFTER_2, AFTER_1, HELD]}}  # fmt: skip
    fake.overrides[NEW] = [fake.reply(listing)]
    with source_for(make_settings, http_server, tmp_path) as source:
        ids = [p.post_id for p in source.fetch(FetchWindow(cursor={"streams": {"r:analog": {"after": APPROVED_SAVED}}}))]
    # Every post of the listing, the approved one too, down to the held one (read again: fewer than three in a row
    # at or below the saved id do not end a read); the listing reached the saved place, so no warning of its reach.
    assert ids == ["1j8c115", "1j8bz00", "1j8c113", "1j8c112", "1j8c111"], ids
    assert "ended before the last run's newest post" not in caplog.text
    assert source.cursor == {"streams": {"r:analog": {"after": "1j8c115"}}}
