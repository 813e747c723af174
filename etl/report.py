"""`etl.py report`: one self-contained HTML file (charts as inline SVG, thumbnails as data URIs) of the archive.

Every figure comes from the SQL functions of sql/006_insights.sql (usable from any BI tool too); Python only
draws them. Charts are drawn by matplotlib's SVG backend with text as paths: no font, script or image is
fetched when the file is opened, offline or not.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from etl.db import Database
from etl.db.insights import report_aggregates
from etl.store import ObjectStore

log = logging.getLogger(__name__)

SENTIMENT_COLORS = {"positive": "#2e9d5b", "neutral": "#9aa3ad", "negative": "#d1495b"}
PALETTE = ["#3366cc", "#dc7633", "#2e9d5b", "#8e44ad", "#d1495b", "#16a2b8", "#b7950b", "#566573"]
THUMB_PX = 96


@dataclass(frozen=True)
class Scope:
    """Which posts the report covers: created in [since, until), of one platform or all."""

    since: datetime | None = None
    until: datetime | None = None
    platform: str | None = None

    @property
    def args(self) -> tuple[Any, Any, Any]:
        return (self.since, self.until, self.platform)

    def describe(self) -> str:
        since = f"{self.since:%Y-%m-%d}" if self.since else "the first post"
        until = f"{self.until:%Y-%m-%d}" if self.until else "now"
        return f"{self.platform or 'all platforms'}, posts from {since} to {until}"


def collect(
    db: Database, scope: Scope, *, max_distance: int, min_count: int, top: int = 10, runs: int = 10
) -> dict[str, Any]:
    """Every aggregate of the report, read in one transaction (one consistent snapshot)."""
    now = datetime.now(timezone.utc)

    def period_end(totals: dict[str, Any]) -> datetime:
        # Rising hashtags as of the end of the period: --until, else the newest post in scope (an archive that
        # stopped growing still shows what was rising at its end), else now.
        if scope.until:
            return min(scope.until, now)
        if totals["last_post"]:
            return totals["last_post"] + timedelta(microseconds=1)  # the window ends just after the newest post
        return now

    data = report_aggregates(
        db, *scope.args, now=now, period_end=period_end, max_distance=max_distance, min_count=min_count, top=top, runs=runs
    )
    data.update(scope=scope, max_distance=max_distance, min_count=min_count)
    return data


# -- charts ------------------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 3.0) -> Any:
    import matplotlib

    matplotlib.rcParams["svg.fonttype"] = "path"  # text drawn as paths: no font needed to open the file
    matplotlib.rcParams["svg.hashsalt"] = "social-archiver"  # stable element ids from one report to the next
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96)
    fig.set_layout_engine("constrained")
    return fig


def _svg(fig: Any, name: str) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    svg = text[text.index("<svg") :]
    return f'<figure class="chart" data-chart="{name}">{svg}</figure>'


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data in this scope", ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def chart_posts_per_day(rows: list[dict[str, Any]]) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    platforms = sorted({r["platform"] for r in rows})
    days = sorted({r["day"] for r in rows})
    if not rows:
        _no_data(ax)
    counts = {(r["day"], r["platform"]): r["posts"] for r in rows}
    bottom = [0] * len(days)
    for i, platform in enumerate(platforms):
        values = [counts.get((d, platform), 0) for d in days]
        ax.bar(days, values, bottom=bottom, label=platform, color=PALETTE[i % len(PALETTE)], width=0.8)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    if rows:
        ax.set_ylabel("posts")
        ax.legend(fontsize=8, ncols=min(len(platforms), 4))
        fig.autofmt_xdate()
    ax.set_title("Posts per day and platform", fontsize=10)
    return _svg(fig, "posts_per_day")


def chart_sentiment(rows: list[dict[str, Any]]) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    if not rows:
        _no_data(ax)
    else:
        days = [r["day"] for r in rows]
        shares = {s: [100 * r[s] / r["posts"] if r["posts"] else 0 for r in rows] for s in SENTIMENT_COLORS}
        ax.stackplot(days, *shares.values(), labels=list(shares), colors=list(SENTIMENT_COLORS.values()), alpha=0.9)
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of posts")
        ax.legend(fontsize=8, loc="upper left", ncols=3)
        fig.autofmt_xdate()
    ax.set_title("Sentiment share per day", fontsize=10)
    return _svg(fig, "sentiment_share")


def chart_share_of_voice(rows: list[dict[str, Any]]) -> str:
    fig = _figure(7.0, 0.6 + 0.45 * max(len(rows), 2))
    ax = fig.add_subplot()
    if not rows:
        _no_data(ax)
    else:
        names = [r["platform"] for r in rows][::-1]
        posts = [100 * r["post_share"] for r in rows][::-1]
        engagement = [100 * r["engagement_share"] for r in rows][::-1]
        ys = range(len(names))
        ax.barh([y + 0.2 for y in ys], posts, height=0.4, label="posts", color="#3366cc")
        ax.barh([y - 0.2 for y in ys], engagement, height=0.4, label="engagement", color="#dc7633")
        ax.set_yticks(list(ys), names)
        ax.set_xlabel("% share")
        ax.legend(fontsize=8)
    ax.set_title("Share of voice per platform", fontsize=10)
    return _svg(fig, "share_of_voice")


def chart_bars(rows: list[dict[str, Any]], label: str, value: str, title: str, name: str, color: str) -> str:
    fig = _figure(7.0, 0.6 + 0.3 * max(len(rows), 3))
    ax = fig.add_subplot()
    if not rows:
        _no_data(ax)
    else:
        labels = ["#" + str(r[label]) for r in rows][::-1]
        ax.barh(labels, [float(r[value]) for r in rows][::-1], color=color)
        ax.tick_params(axis="y", labelsize=8)
    ax.set_title(title, fontsize=10)
    return _svg(fig, name)


# -- HTML --------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) or (hasattr(value, "is_integer") and value == int(value)):
        return f"{int(value):,}"
    return str(value)


def _table(name: str, columns: list[tuple[str, str]], rows: list[dict[str, Any]], key: str, extra: dict | None = None) -> str:
    """A table whose rows carry data-key and cells data-col (what tests and scrapers read back)."""
    if not rows:
        return f'<p class="empty" data-table="{name}">none</p>'
    head = "".join(f"<th>{_e(title)}</th>" for _, title in columns)
    body = []
    for row in rows:
        cells = []
        for col, _ in columns:
            content = (extra or {}).get(col, lambda r, c=col: _e(_fmt(r[c])))(row)
            cells.append(f'<td data-col="{col}">{content}</td>')
        body.append(f'<tr data-key="{_e(row[key])}">{"".join(cells)}</tr>')
    return f'<table data-table="{name}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def thumbnail(store: ObjectStore | None, key: str | None) -> str:
    """The stored image, shrunk to THUMB_PX and inlined as a data URI; '' when it cannot be read."""
    if store is None or not key:
        return ""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(store.read(key))) as img:
            if img.format == "JPEG":
                img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
            img.thumbnail((THUMB_PX, THUMB_PX))
            out = io.BytesIO()
            img.convert("RGB").save(out, format="JPEG", quality=75)
    except Exception as exc:  # a missing or unreadable object costs its thumbnail, not the report
        log.warning("no thumbnail for %s: %s: %s", key, type(exc).__name__, exc)
        return ""
    data = base64.b64encode(out.getvalue()).decode("ascii")
    return f'<img class="thumb" alt="" src="data:image/jpeg;base64,{data}">'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 10px}
.muted{color:#5c6675;font-size:13px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:10px;margin-top:16px}
.card{background:#fff;border-radius:8px;padding:12px;box-shadow:0 1px 2px #0001}
.card b{display:block;font-size:22px} .card span{font-size:12px;color:#5c6675}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:14px}
figure.chart{background:#fff;border-radius:8px;margin:0;padding:8px;box-shadow:0 1px 2px #0001}
figure.chart svg{width:100%;height:auto;display:block}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px;box-shadow:0 1px 2px #0001}
th,td{padding:6px 8px;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top}
th{background:#eef0f3;font-weight:600} td.num{text-align:right}
img.thumb{width:auto;height:auto;max-width:96px;max-height:96px;border-radius:4px;display:block}
.caption{max-width:380px;overflow-wrap:anywhere}
"""


def render(data: dict[str, Any], store: ObjectStore | None) -> str:
    t = data["totals"]
    scope: Scope = data["scope"]
    cards = [
        ("posts", "posts"), ("authors", "accounts"), ("platforms", "platforms"), ("images_stored", "images stored"),
        ("distinct_images", "distinct images"), ("images_failed", "images failed"), ("likes", "likes"),
        ("comments", "comments"),
    ]  # fmt: skip
    card_html = "".join(
        f'<div class="card"><b data-metric="{k}">{_fmt(t[k])}</b><span>{_e(label)}</span></div>' for k, label in cards
    )
    size_mb = float(t["bytes_stored"] or 0) / 1e6
    voice = _table(
        "share_of_voice",
        [("platform", "platform"), ("posts", "posts"), ("authors", "accounts"), ("engagement", "likes + comments"),
         ("post_share", "share of posts"), ("engagement_share", "share of engagement")],
        data["voice"], "platform",
        {"post_share": lambda r: f"{100 * r['post_share']:.1f}%", "engagement_share": lambda r: f"{100 * r['engagement_share']:.1f}%"},
    )  # fmt: skip
    hashtags = _table("top_hashtags", [("hashtag", "hashtag"), ("posts", "posts"), ("platforms", "platforms")], data["hashtags"], "hashtag")
    rising = _table(
        "rising_hashtags",
        [("hashtag", "hashtag"), ("window_posts", "last 24 h"), ("baseline_mean", "mean per day, 28 d"),
         ("z_score", "z"), ("growth", "growth")],
        data["rising"], "hashtag",
    )  # fmt: skip
    top_posts = _table(
        "top_posts",
        [("image", "image"), ("platform", "platform"), ("author_username", "account"), ("caption", "caption"),
         ("created_at", "posted (UTC)"), ("like_count", "likes"), ("comment_count", "comments"), ("engagement", "engagement")],
        [{**r, "key": f"{r['platform']}:{r['post_id']}"} for r in data["top_posts"]], "key",
        {"image": lambda r: thumbnail(store, r["image_key"]),
         "caption": lambda r: f'<div class="caption">{_e((r["caption"] or "")[:280])}</div>'},
    )  # fmt: skip
    images = _table(
        "image_spread",
        [("image", "image"), ("sha256", "sha256"), ("posts", "posts (same bytes)"), ("near_posts", "more posts, near duplicates"),
         ("accounts", "accounts"), ("platforms", "platforms"), ("first_seen", "first seen"), ("last_seen", "last seen")],
        data["images"], "sha256",
        {"image": lambda r: thumbnail(store, r["storage_key"]), "sha256": lambda r: f"<code>{_e(r['sha256'][:16])}…</code>"},
    )  # fmt: skip
    growing = _table(
        "growing_posts",
        [("platform", "platform"), ("author_username", "account"), ("likes_gained", "likes gained"),
         ("comments_gained", "comments gained"), ("like_count", "likes now"), ("comment_count", "comments now"),
         ("since_observed_at", "from (UTC)"), ("last_observed_at", "to (UTC)")],
        [{**r, "key": f"{r['platform']}:{r['post_id']}"} for r in data["growing"]], "key",
    )  # fmt: skip
    failed = _table(
        "failed_images", [("reason", "reason"), ("permanent", "permanent"), ("images", "images"), ("platforms", "platforms")],
        [{**r, "key": f"{r['reason']}|{r['permanent']}"} for r in data["failed"]], "key",
        {"permanent": lambda r: "yes" if r["permanent"] else "no (retried)"},
    )  # fmt: skip
    runs = _table(
        "runs",
        [("id", "run"), ("mode", "mode"), ("sources", "sources"), ("started_at", "started (UTC)"), ("seconds", "seconds"),
         ("status", "status"), ("posts_fetched", "fetched"), ("posts_inserted", "new"), ("posts_updated", "updated"),
         ("images_stored", "images stored"), ("images_failed", "images failed")],
        data["runs"], "id", {"sources": lambda r: _e(", ".join(r["sources"] or []))},
    )  # fmt: skip
    charts_top = "".join([chart_posts_per_day(data["per_day"]), chart_sentiment(data["sentiment"])])
    charts_tags = "".join(
        [
            chart_bars(data["hashtags"], "hashtag", "posts", "Top hashtags (posts)", "top_hashtags", "#3366cc"),
            chart_bars(data["rising"], "hashtag", "z_score", "Rising hashtags (z-score, last 24 h vs 28 d)", "rising_hashtags", "#dc7633"),
        ]
    )
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Social archive report</title>
<style>{_CSS}</style></head>
<body><main>
<h1>Social archive report</h1>
<div class="muted">{_e(scope.describe())} · generated {generated} · posts {_fmt(t['first_post'])} to {_fmt(t['last_post'])} ·
{size_mb:,.1f} MB of images</div>
<section><div class="cards">{card_html}</div></section>
<section><h2>Activity</h2><div class="grid">{charts_top}</div></section>
<section><h2>Share of voice</h2><div class="grid">{chart_share_of_voice(data["voice"])}<div>{voice}</div></div></section>
<section><h2>Hashtags</h2><div class="grid">{charts_tags}</div>
<h3>Top hashtags</h3>{hashtags}
<h3>Rising hashtags</h3><p class="muted">as of {_fmt(data['as_of'])} UTC: z = (x − mean) / max(sd, √mean, 1) of the last 24 h against the 28 days
before, in 24-hour windows; growth = (x + 1) / (mean + 1); at least {data['min_count']} posts in the window.</p>{rising}</section>
<section><h2>Top posts by engagement</h2><p class="muted">engagement = likes + comments</p>{top_posts}</section>
<section><h2>Images seen in the most posts</h2><p class="muted">groups of identical bytes (sha256), with the posts
holding a near duplicate (64-bit difference hash within Hamming distance {data['max_distance']})</p>{images}</section>
<section><h2>Fastest-growing posts</h2><p class="muted">likes and comments gained over the last 7 days, from the
engagement snapshots the runs record</p>{growing}</section>
<section><h2>Failed images by reason</h2>{failed}</section>
<section><h2>Last runs</h2>{runs}</section>
</main></body></html>
"""


def write_report(
    db: Database, store: ObjectStore | None, scope: Scope, out: Any, *, max_distance: int, min_count: int
) -> dict[str, Any]:
    """Collect, render and write the report atomically; returns the collected data with timings."""
    from pathlib import Path

    started = time.monotonic()
    data = collect(db, scope, max_distance=max_distance, min_count=min_count)
    queried = time.monotonic()
    page = render(data, store)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    data["timings"] = {"sql": queried - started, "render": time.monotonic() - queried}
    data["bytes"] = len(page.encode("utf-8"))
    return data
