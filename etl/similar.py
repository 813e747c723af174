"""`etl.py similar --post PLATFORM:POST_ID`: where a post's images were seen again (exact, then near duplicates)."""

from __future__ import annotations

from typing import Any

from etl.db import Database
from etl.errors import UsageError
from etl.status import table


def parse_post_ref(value: str) -> tuple[str, str]:
    """PLATFORM:POST_ID (the post_id may itself hold colons, as Bluesky's at:// URIs do)."""
    platform, sep, post_id = value.partition(":")
    if not sep or not platform or not post_id:
        raise UsageError(f"--post {value!r}: expected PLATFORM:POST_ID, e.g. youtube:dQw4w9WgXcQ")
    return platform.strip().lower(), post_id


def find_similar(db: Database, platform: str, post_id: str, max_distance: int) -> dict[str, Any]:
    """The post's stored images, each with its sightings (sql/006 image_sightings) and a summary."""

    def read(cur: Any) -> dict[str, Any]:
        cur.execute("SELECT author_username, created_at FROM social_posts WHERE platform = %s AND post_id = %s", (platform, post_id))
        post = cur.fetchone()
        if post is None:
            raise UsageError(f"--post {platform}:{post_id}: no such post in the archive")
        cur.execute(
            "SELECT position, sha256, phash, status FROM post_media WHERE platform = %s AND post_id = %s ORDER BY position",
            (platform, post_id),
        )
        images = [
            {"position": r[0], "sha256": r[1], "fingerprinted": r[2] is not None, "status": r[3], "sightings": []}
            for r in cur.fetchall()
        ]
        cur.execute("SELECT * FROM image_sightings(%s, %s, %s)", (platform, post_id, max_distance))
        names = [d[0] for d in cur.description]
        by_position = {image["position"]: image for image in images}
        for row in cur.fetchall():
            sighting = dict(zip(names, row, strict=True))
            by_position[sighting.pop("image_position")]["sightings"].append(sighting)
        for image in images:
            # Exact copies first: image_sightings orders by distance, and a near duplicate (other bytes) can be
            # at distance 0 too. A stable sort keeps the function's order within each kind.
            image["sightings"].sort(key=lambda s: s["match"] != "exact")
        return {"author_username": post[0], "created_at": post[1], "images": images}

    result = db.run(read, what="looking up similar images")
    result.update(platform=platform, post_id=post_id, max_distance=max_distance)
    for image in result["images"]:
        seen = image["sightings"]
        others = {(s["platform"], s["post_id"]) for s in seen} - {(platform, post_id)}
        times = [s["created_at"] for s in seen] + [result["created_at"]]
        image["summary"] = {
            "other_posts": len(others),
            "accounts": len({(s["platform"], s["author_username"]) for s in seen if (s["platform"], s["post_id"]) in others}),
            "platforms": sorted({p for p, _ in others}),
            "first_seen": min(times),
            "last_seen": max(times),
        }
    return result


def format_similar(result: dict[str, Any]) -> str:
    out = [
        f"Post {result['platform']}:{result['post_id']} by {result['author_username'] or '?'}, "
        f"{result['created_at']:%Y-%m-%d %H:%M} UTC (near duplicates: Hamming distance <= {result['max_distance']})"
    ]
    if not result["images"]:
        out.append("  this post has no images")
    for image in result["images"]:
        out.append("")
        if image["status"] != "stored":
            out.append(f"Image #{image['position']}: not archived ({image['status']}), nothing to compare")
            continue
        s = image["summary"]
        note = "" if image["fingerprinted"] else " (no fingerprint yet: run `etl.py fingerprint` for near duplicates)"
        out.append(
            f"Image #{image['position']} (sha256 {image['sha256'][:12]}…){note}: seen in {s['other_posts']} other post(s), "
            f"{s['accounts']} account(s), platforms {', '.join(s['platforms']) or '-'}; "
            f"first seen {s['first_seen']:%Y-%m-%d %H:%M}, last seen {s['last_seen']:%Y-%m-%d %H:%M}"
        )
        if image["sightings"]:
            out.append(
                table(
                    ["match", "dist", "platform", "post_id", "img", "author", "posted (UTC)"],
                    [
                        [x["match"], x["distance"], x["platform"], x["post_id"], x["media_position"], x["author_username"], x["created_at"]]
                        for x in image["sightings"]
                    ],
                )
            )
    return "\n".join(out)
