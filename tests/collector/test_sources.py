"""Each source end to end against its stand-in on 127.0.0.1: requests as the API documents them,
paging, rate limits, keys, attribution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kubetune.dev.testing.collected import fetch_flags, manifest, metadata
from kubetune.dev.testing.webapis import (
    GoogleCSE,
    Openverse,
    StandIn,
    Unsplash,
    Wikimedia,
    make_photos,
)


@pytest.fixture
def unsplash(server: StandIn, monkeypatch: pytest.MonkeyPatch) -> Unsplash:
    monkeypatch.setenv("KUBETUNE_UNSPLASH_API_URL", server.base)
    monkeypatch.setenv("UNSPLASH_ACCESS_KEY", "unsplash-secret-key")
    photos = {"lighthouse": make_photos("lh", 35, seed=1), "fog": make_photos("fog", 4, seed=2)}
    return Unsplash(server, "unsplash-secret-key", photos)


def test_unsplash_pages_credits_and_pings_downloads(
    collect: Any, server: StandIn, unsplash: Unsplash, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = collect(
        "--prompts", "lighthouse", "fog", "--num-images", "32", "--unsplash-size", "raw", *fetch_flags(server, out)
    )
    assert result.code == 0, result.stderr

    searches = [r for r in server.requests if r.path == "/search/photos"]
    assert [(r.query["query"], r.query["page"], r.query["per_page"]) for r in searches] == [
        ("lighthouse", "1", "30"),
        ("lighthouse", "2", "30"),
        ("fog", "1", "30"),
    ]
    assert all(r.header("Authorization") == "Client-ID unsplash-secret-key" for r in searches)
    rows = metadata(out)
    assert sum(r["text"] == "lighthouse" for r in rows) == 32 and sum(r["text"] == "fog" for r in rows) == 4
    assert manifest(out)["counts"] == {"requested": 64, "kept": 36, "skipped": {}}
    assert all(r["license"] == "Unsplash License" and r["author"].startswith("Photographer ") for r in rows)
    # raw is resized by Unsplash (imgix) to the dataset resolution, shorter side first
    images = [r for r in server.requests if r.path.startswith("/unsplash-img/")]
    assert len(images) == 36 and all(
        r.query.get("fit") == "max" and "64" in (r.query.get("w"), r.query.get("h")) for r in images
    )
    assert sorted(unsplash.downloads) == sorted(r["url"].split("/unsplash-img/")[1].split("?")[0] for r in rows)
    assert (
        "unsplash-secret-key"
        not in result.stderr + (out / "manifest.json").read_text() + (out / "README.md").read_text()
    )


def test_unsplash_stops_cleanly_when_the_hourly_budget_is_spent(
    collect: Any, server: StandIn, unsplash: Unsplash, tmp_path: Path
) -> None:
    unsplash.remaining = 1  # one search left this hour, and then no download pings either
    out = tmp_path / "out"
    result = collect(
        "--prompts", "lighthouse", "fog", "--num-images", "32", "--unsplash-size", "small", *fetch_flags(server, out)
    )
    assert result.code == 0, result.stderr
    assert server.count("/search/photos") == 1
    assert manifest(out)["counts"]["kept"] == 30 and manifest(out)["counts"]["requested"] == 64
    assert "Unsplash rate limit spent" in result.stderr and "refills within the hour" in result.stderr
    assert any("rate limit" in note for note in manifest(out)["notes"])


def test_unsplash_refused_key_is_one_line_and_exit_2(
    collect: Any, server: StandIn, unsplash: Unsplash, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNSPLASH_ACCESS_KEY", "wrong-key")
    result = collect("--prompts", "fog", *fetch_flags(server, tmp_path / "out"))
    assert result.code == 2
    assert (
        result.last_line
        == "kubetune collect: error: Unsplash refused the credentials (HTTP 401): check UNSPLASH_ACCESS_KEY"
    )
    assert "wrong-key" not in result.stderr


def google(server: StandIn, monkeypatch: pytest.MonkeyPatch, query: str, **options: Any) -> GoogleCSE:
    """The Google stand-in on SERVER with 40 photos for QUERY, and the environment that points
    `kubetune collect` at it."""
    monkeypatch.setenv("KUBETUNE_GOOGLE_API_URL", server.base)
    monkeypatch.setenv("GOOGLE_API_KEY", "google-secret")
    monkeypatch.setenv("GOOGLE_CSE_ID", "engine-1")
    return GoogleCSE(server, "google-secret", "engine-1", {query: make_photos("kite", 40, seed=3)}, **options)


def test_google_image_search_pages_by_ten(
    collect: Any, server: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    google(server, monkeypatch, "red kite")
    out = tmp_path / "out"
    result = collect("-site", "google", "--prompts", "red kite", "-num_imgs", "25", *fetch_flags(server, out))
    assert result.code == 0, result.stderr
    searches = [r for r in server.requests if r.path == "/customsearch/v1"]
    assert [(r.query["start"], r.query["num"], r.query["searchType"], r.query["safe"]) for r in searches] == [
        ("1", "10", "image", "active"),
        ("11", "10", "image", "active"),
        ("21", "10", "image", "active"),
    ]
    assert all("key" not in r.query for r in searches)  # the key travels in a header, never in a URL
    assert len(metadata(out)) == 25 and all(r["text"] == "red kite" for r in metadata(out))


def test_google_daily_quota_stops_with_what_was_found(
    collect: Any, server: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    google(server, monkeypatch, "kite", quota=1)
    out = tmp_path / "out"
    result = collect("--site", "google", "--prompts", "kite", "--num-images", "25", *fetch_flags(server, out))
    assert result.code == 0, result.stderr
    assert len(metadata(out)) == 10 and "quota spent" in result.stderr


@pytest.mark.parametrize("credentials", [False, True], ids=["anonymous", "client-credentials"])
def test_openverse_with_license_filters(
    collect: Any, server: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, credentials: bool
) -> None:
    monkeypatch.setenv("KUBETUNE_OPENVERSE_API_URL", server.base)
    if credentials:
        monkeypatch.setenv("OPENVERSE_CLIENT_ID", "ov-id")
        monkeypatch.setenv("OPENVERSE_CLIENT_SECRET", "ov-secret")
    licenses = ["by", "by-nc", "cc0", "by-sa"]
    photos = [(p, licenses[i % 4]) for i, p in enumerate(make_photos("ov", 40, seed=4))]
    Openverse(server, {"harbour": photos}, client_id="ov-id", client_secret="ov-secret")
    out = tmp_path / "out"
    result = collect(
        "--site",
        "openverse",
        "--prompts",
        "harbour",
        "--num-images",
        "25",
        "--openverse-license-type",
        "commercial",
        *fetch_flags(server, out),
    )
    assert result.code == 0, result.stderr
    rows = metadata(out)
    assert len(rows) == 25 and not any("nc" in r["license"] for r in rows)
    assert all(r["author"].startswith("Creator ") and r["source"] == "openverse" for r in rows)
    searches = [r for r in server.requests if r.path == "/v1/images/"]
    assert all(r.query["license_type"] == "commercial" for r in searches)
    assert server.count("/v1/auth_tokens/token/") == (1 if credentials else 0)
    assert all(r.header("Authorization") == ("Bearer openverse-token-123" if credentials else "") for r in searches)
    assert len(searches) == (1 if credentials else 2)  # 20 per page anonymously, 50 with a token


def test_openverse_needs_both_client_values(collect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENVERSE_CLIENT_ID", "ov-id")
    monkeypatch.delenv("OPENVERSE_CLIENT_SECRET", raising=False)
    result = collect("--site", "openverse", "--prompts", "x", "--output", str(tmp_path))
    assert result.code == 2
    assert result.last_line.startswith("kubetune collect: error: OPENVERSE_CLIENT_SECRET is not set")


def test_wikimedia_thumbnails_licenses_and_polite_requests(
    collect: Any, server: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_WIKIMEDIA_API_URL", server.url("/w/api.php"))
    wiki = Wikimedia(server, {"windmill": make_photos("wm", 12, seed=5, width=400, height=300)}, page_limit=5)
    out = tmp_path / "out"
    result = collect(
        "--site",
        "wikimedia",
        "--prompts",
        "windmill",
        "--num-images",
        "12",
        "--wikimedia-contact",
        "ops@example.org",
        *fetch_flags(server, out),
    )
    assert result.code == 0, result.stderr
    api = [r for r in server.requests if r.path == "/w/api.php"]
    assert len(api) == 3  # 5 per page, paged with `continue`
    assert [r.query.get("gsroffset") for r in api] == [None, "5", "10"]
    assert all(r.query["iiurlwidth"] == "64" and "extmetadata" in r.query["iiprop"] for r in api)
    assert all(
        "ops@example.org" in r.header("User-Agent") and r.header("User-Agent").startswith("kubetune") for r in api
    )
    rows = metadata(out)
    assert len(rows) == 12 and all(r["license"] == "CC BY-SA 4.0" and r["author"].startswith("Artist wm") for r in rows)
    # thumbnails whose shorter side covers the resolution: no full-size downloads
    thumbs = [r.path for r in server.requests if r.path.startswith("/wikipedia/commons/thumb/")]
    assert len(thumbs) == 12 and server.count("/wikipedia/commons/a/") == 0
    for row in rows:
        with Image.open(out / "train" / row["file_name"]) as image:
            assert min(image.size) == 64
    assert wiki.api_max_active == 1 and server.max_active <= 3  # serial API calls, at most 2 downloads


def test_missing_key_fails_before_any_request(
    collect: Any, server: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_UNSPLASH_API_URL", server.base)
    monkeypatch.delenv("UNSPLASH_ACCESS_KEY", raising=False)
    result = collect("--prompts", "fog", "--output", str(tmp_path / "out"))
    assert result.code == 2
    assert result.stderr.strip() == (
        "kubetune collect: error: UNSPLASH_ACCESS_KEY is not set: the unsplash source needs an Unsplash API "
        "access key in this environment variable"
    )
    assert server.count() == 0 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("site", "variable", "path", "page"),
    [
        ("unsplash", "KUBETUNE_UNSPLASH_API_URL", "/search/photos", "results"),
        ("google", "KUBETUNE_GOOGLE_API_URL", "/customsearch/v1", "items"),
        ("openverse", "KUBETUNE_OPENVERSE_API_URL", "/v1/images/", "results"),
    ],
)
def test_a_search_result_missing_an_expected_key_is_a_counted_skip(
    collect: Any,
    server: StandIn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    site: str,
    variable: str,
    path: str,
    page: str,
) -> None:
    from kubetune.dev.testing.webapis import Reply, photo

    monkeypatch.setenv(variable, server.base)
    for name in ("UNSPLASH_ACCESS_KEY", "GOOGLE_API_KEY", "GOOGLE_CSE_ID"):
        monkeypatch.setenv(name, "key")
    image = photo(160, 120, 7)
    server.route("/good.jpg", lambda _: Reply(200, image, "image/jpeg"))
    url = server.url("/good.jpg")
    good = {
        "unsplash": {"id": "a", "urls": dict.fromkeys(("raw", "full", "regular", "small", "thumb"), url)},
        "google": {"link": url},
        "openverse": {"id": "a", "url": url, "license": "by"},
    }[site]
    broken = {"unsplash": {"id": "b"}, "google": {"title": "no link"}, "openverse": {"id": "b"}}[site]
    body = {page: [broken, good, "not an object"], "total_pages": 1, "page_count": 1}
    server.route(path, lambda _: Reply.json(body))
    out = tmp_path / "out"
    result = collect("--site", site, "--prompts", "harbour", "--num-images", "5", *fetch_flags(server, out))
    assert result.code == 0, result.stderr
    assert manifest(out)["counts"]["skipped"] == {"incomplete-result": 2}
    assert [r["url"].split("?")[0] for r in metadata(out)] == [url]
