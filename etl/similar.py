"""`etl.py similar --post PLATFORM:POST_ID`: where a post's images were seen again (exact, then near duplicates)."""

from __future__ import annotations

from typing import Any

from etl.db import Database
from etl.db.insights import post_images_with_sightings
from etl.errors import UsageError
from etl.status import table, utc_minute


def parse_post_ref(value: str) -> tuple[str, str]:
    """PLATFORM:POST_ID (the post_id may itself hold colons, as Bluesky's at:// URIs do)."""
    platform, sep, post_id = value.partition(":")
    if not sep or not platform or not post_id:
        raise UsageError(f"--post {value!r}: expected PLATFORM:POST_ID, e.g. youtube:dQw4w9WgXcQ")
    return platform.strip().lower(), post_id


def find_similar(db: Database, platform: str, post_id: str, max_distance: int) -> dict[str, Any]:
    """The post's stored images, each with its sightings (sql/006 image_sightings) and a summary."""
    result = post_images_with_sightings(db, platform, post_id, max_distance)
    if result is None:
        raise UsageError(f"--post {platform}:{post_id}: no such post in the archive")
    result.update(platform=platform, post_id=post_id, max_distance=max_distance)
    for image in result["images"]:
        seen = image["sightings"]
        # Exact copies first: image_sightings orders by distance, and a near duplicate (other bytes) can be
        # at distance 0 too. A stable sort keeps the function's order within each kind.
        seen.sort(key=lambda s: s["match"] != "exact")
        others = {(s["platform"], s["post_id"]) for s in seen} - {(platform, post_id)}
        times = [s["created_at"] for s in seen] + [result["created_at"]]
        image["summary"] = {
            "other_posts": len(others),
            "accounts": _accounts([s for s in seen if (s["platform"], s["post_id"]) in others]),
            "platforms": sorted({p for p, _ in others}),
            "first_seen": min(times),
            "last_seen": max(times),
        }
    return result


def _accounts(sightings: list[dict[str, Any]]) -> int:
    """Distinct (platform, author) of these sightings. A post whose author the platform did not give is no
    account, as in the report's totals and share of voice (sql/016): None is not one more author."""
    return len({(s["platform"], s["author_username"]) for s in sightings if s["author_username"] is not None})


def format_similar(result: dict[str, Any]) -> str:
    out = [
        f"Post {result['platform']}:{result['post_id']} by {result['author_username'] or '?'}, "
        f"{utc_minute(result['created_at'])} UTC (near duplicates: Hamming distance <= {result['max_distance']})"
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
            f"first seen {utc_minute(s['first_seen'])}, last seen {utc_minute(s['last_seen'])}"
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
