"""What the benchmark feeds the archiver and its peers: real images, synthetic posts as jsonl, rows made in SQL."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol


class ImageFactory:
    """~30 KB real images, distinct bytes for every index: a pool of base images, each given a unique comment
    (a JPEG COM segment, a PNG tEXt chunk) so checksums differ while every body is still a full, valid image."""

    def __init__(self, jpegs: int = 24, pngs: int = 8, seed: int = 6):
        from PIL import Image, ImageFilter

        rng = random.Random(seed)
        self.jpegs: list[bytes] = []
        self.pngs: list[bytes] = []
        for n in range(jpegs + pngs):
            png = n >= jpegs
            w, h = (200, 150) if png else (480, 360)
            gradient = Image.linear_gradient("L").resize((w, h)).rotate(rng.choice((0, 90, 180, 270)), expand=False)
            bands = []
            for _ in range(3):
                noise = Image.effect_noise((w, h), 40 if png else 64).filter(ImageFilter.GaussianBlur(1))
                bands.append(Image.blend(gradient, noise, rng.uniform(0.4, 0.6)))
            image = Image.merge("RGB", bands)
            buf = io.BytesIO()
            if png:
                image.save(buf, format="PNG")
            else:
                image.save(buf, format="JPEG", quality=80)
            (self.pngs if png else self.jpegs).append(buf.getvalue())

    @staticmethod
    def is_png(index: int) -> bool:
        return index % 4 == 3  # one image in four is a PNG

    def ext(self, index: int) -> str:
        return "png" if self.is_png(index) else "jpg"

    def content_type(self, index: int) -> str:
        return "image/png" if self.is_png(index) else "image/jpeg"

    def body(self, index: int) -> bytes:
        tag = f"bench image {index}".encode()
        if self.is_png(index):
            base = self.pngs[index % len(self.pngs)]
            chunk = b"tEXt" + b"Comment\x00" + tag
            text = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
            return base[:33] + text + base[33:]  # after the signature (8) and IHDR (25)
        base = self.jpegs[index % len(self.jpegs)]
        return base[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + base[2:]  # COM right after SOI

    @property
    def mean_kb(self) -> float:
        sizes = [len(b) for b in self.jpegs] * 3 + [len(b) for b in self.pngs]
        return sum(sizes) / len(sizes) / 1024


class ImageURLs(Protocol):
    def url(self, index: int) -> str: ...


_WORDS = (
    "the a this that my our your new old first last morning evening night day week city street beach park "
    "coffee dinner lunch trip road view light rain sun snow sky river mountain friends family team crew "
    "launch release update project photo shot walk ride game match show concert album track book film "
    "with from at in on for about after before during again still just finally today tomorrow yesterday"
).split()
_MOODS = (
    "love amazing great beautiful happy awesome wonderful excellent best fun perfect good nice cool lovely "
    "bad terrible awful sad worst boring disappointing horrible angry broken tired ugly poor wrong late"
).split()
_TAGS = ("travel", "food", "photography", "nature", "music", "tech", "sports", "art", "fashion", "fitness")
PLATFORMS = ("instagram", "twitter", "youtube")


def write_posts(path: Path, count: int, images_per_post: int, host: ImageURLs | None, *, seed: int = 6) -> Path:
    """`count` normalized posts as JSON lines; captions differ per post so the sentiment cache cannot help."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    with path.open("w", encoding="utf-8") as out:
        for n in range(count):
            words = rng.choices(_WORDS, k=rng.randint(6, 24))
            for _ in range(rng.randint(0, 3)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(_MOODS))
            if rng.random() < 0.2:
                words.append(f"@user{rng.randrange(1000)}")
            if rng.random() < 0.1:
                words.append(f"https://example.com/p/{n}")
            words.extend("#" + t for t in rng.sample(_TAGS, rng.randint(0, 3)))
            platform = PLATFORMS[n % len(PLATFORMS)]
            post = {
                "platform": platform,
                "post_id": f"bench-{n:07d}",
                "author_username": f"author{rng.randrange(5000)}",
                "caption": f"{' '.join(words)} {n}",
                "created_at": (now - timedelta(minutes=count - n)).isoformat().replace("+00:00", "Z"),
                "like_count": rng.randrange(100_000),
                "comment_count": rng.randrange(5_000),
                "permalink": f"https://{platform}.example/p/bench-{n:07d}",
                "image_urls": [host.url(n * images_per_post + k) for k in range(images_per_post)] if host else [],
            }
            out.write(json.dumps(post) + "\n")
    return path


def read_posts(path: Path, limit: int) -> list[dict[str, Any]]:
    posts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(posts) >= limit:
                break
            posts.append(json.loads(line))
    return posts


def stream_feeds(streams: int, posts: int, host: ImageURLs) -> dict[str, bytes]:
    """The feeds of the many-stream source `streamy` (tests/streamy.py): /feed/f<s> -> its posts, newest first,
    each with one image of `host`."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    feeds: dict[str, bytes] = {}
    index = 0
    for s in range(streams):
        records = []
        for k in range(posts):
            records.append({
                "platform": "streamy", "post_id": f"f{s}-{k}", "author_username": f"author{s}",
                "caption": f"post {k} of feed {s}", "created_at": (now - timedelta(minutes=k * streams + s)).isoformat(),
                "image_urls": [host.url(index)],
            })  # fmt: skip
            index += 1
        feeds[f"f{s}"] = json.dumps(records).encode()
    return feeds


# -- rows generated inside PostgreSQL (the insights and the export, where loading through etl.py is not measured)

INSIGHTS_ROWS = """
INSERT INTO social_posts (platform, post_id, author_username, caption, sentiment, like_count, comment_count, hashtags, created_at)
SELECT (ARRAY['youtube','twitter','instagram','mastodon'])[1 + n %% 4], 'p' || n, 'user' || (n * 7919 %% 50000),
       'caption ' || n, (ARRAY['positive','neutral','negative'])[1 + (n * 31) %% 3], (n * 37) %% 5000, (n * 13) %% 300,
       ARRAY['tag' || floor(power(random(), 3) * 2000)::int, 'tag' || floor(power(random(), 3) * 2000)::int],
       now() - (random() * interval '60 days')
FROM generate_series(1::bigint, %(n)s) n;
INSERT INTO post_media (platform, post_id, position, source_url, storage_key, storage_url, sha256, bytes, content_type,
                        status, phash, phash_algorithm, phash_version)
SELECT platform, post_id, 0, 'https://img.example/' || post_id,
       platform || '/k/' || post_id || '/0.jpg', 's3://b/' || post_id,
       CASE WHEN id %% 50 = 0 THEN md5((id %% 5000)::text) ELSE md5(id::text) END, 30000, 'image/jpeg', 'stored',
       CASE WHEN id %% 50 = 0 THEN hashtextextended((id %% 5000)::text, 0)
            WHEN id %% 100 = 1 THEN hashtextextended((id - 1)::text, 0) # (1::bigint << (id %% 60)::int) # (1::bigint << 61)
            ELSE hashtextextended(id::text, 0) END,
       'dhash', 1
FROM social_posts;
ANALYZE social_posts; ANALYZE post_media;
"""

EXPORT_POSTS = """
INSERT INTO social_posts (platform, post_id, author_username, caption, sentiment, sentiment_polarity,
    sentiment_subjectivity, sentiment_version, image_s3_url, like_count, comment_count, permalink, hashtags, created_at)
SELECT (ARRAY['youtube', 'twitter', 'instagram'])[1 + i %% 3], 'post-' || i, 'user' || (i %% 5000),
    'Caption ' || i || ': a walk by the sea at #sunset, ' || md5(i::text),
    (ARRAY['positive', 'neutral', 'negative'])[1 + i %% 3], ((i %% 200) - 100) / 100.0, (i %% 100) / 100.0, 'bench',
    's3://bench/' || i || '/0.jpg', i %% 100000, i %% 500, 'https://example.com/p/' || i,
    ARRAY['sunset', 'tag' || (i %% 50)],
    timestamptz '2025-01-01 00:00:00+00' + (i %% 365) * interval '1 day' + (i %% 86400) * interval '1 second'
FROM generate_series(1, %(n)s) AS i
"""
EXPORT_MEDIA = """
INSERT INTO post_media (platform, post_id, position, source_url, storage_key, storage_url, sha256, bytes,
    content_type, width, height, status, attempts, stored_at)
SELECT platform, post_id, 0, 'https://img.example/' || post_id || '.jpg', platform || '/' || post_id || '/0.jpg',
    's3://bench/' || platform || '/' || post_id || '/0.jpg', md5(post_id) || md5(post_id), 30000,
    'image/jpeg', 640, 480, 'stored', 1, created_at + interval '1 minute'
FROM social_posts
"""
EXPORT_UPDATE_SOME = (
    "UPDATE social_posts SET like_count = like_count + 1, updated_at = now() WHERE id %% (%(n)s / 1000) = 0"
)
