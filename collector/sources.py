"""Where candidate images come from. Each source yields groups of candidates, lazily:

- a search source yields one group per prompt, with a quota (images per prompt); its candidates
  page through the search API only as far as the collector asks for more;
- a list source (URL list, hub dataset, image folder) yields one group with no quota.

Search APIs are trusted configuration (their base URLs come from the environment) and are called
with `requests`; the image URLs they return are untrusted and go through `fetch.Fetcher`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from kubetune import __version__
from kubetune.api import models
from kubetune.api.contracts import SOURCE_SECRET_ENV
from kubetune.api.layout import is_safe_file_name
from kubetune.cli_util import name_list
from kubetune.collector.errors import RetryableError, Skip, SourceError
from kubetune.collector.images import clean_caption
from kubetune.storage import StorageError, Store

API_URL_ENV = {
    "unsplash": ("KUBETUNE_UNSPLASH_API_URL", "https://api.unsplash.com"),
    "google": ("KUBETUNE_GOOGLE_API_URL", "https://www.googleapis.com"),
    "openverse": ("KUBETUNE_OPENVERSE_API_URL", "https://api.openverse.org"),
    "wikimedia": ("KUBETUNE_WIKIMEDIA_API_URL", "https://commons.wikimedia.org/w/api.php"),
}


def api_url(source: str) -> str:
    variable, default = API_URL_ENV[source]
    return os.environ.get(variable) or default


@dataclass
class Candidate:
    """One image to try: a URL to download, or bytes already at hand (`load`)."""

    key: str  # stable identity, so a resumed run knows what it already has
    caption: str
    source: str
    group: str = ""  # the prompt it was found for
    url: str = ""
    load: Callable[[], bytes] | None = None
    license: str = ""
    author: str = ""
    page: str = ""  # where a person can see it and its credits
    on_kept: Callable[[], None] | None = None
    skip: str = ""  # a reason to count it as skipped without fetching (e.g. incomplete-result)

    def provenance(self) -> dict[str, str]:
        fields = {
            "source": self.source,
            "url": self.url,
            "license": self.license,
            "author": self.author,
            "page": self.page,
        }
        return {k: v for k, v in fields.items() if v}


@dataclass
class Group:
    name: str
    quota: int | None  # images to keep; None: every candidate
    candidates: Iterator[Candidate]


def candidate_key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


class Source:
    """Base: `groups()` for this shard; `notes` says why a source stopped early."""

    name = ""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def groups(self, shard_index: int, num_shards: int) -> Iterator[Group]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# search APIs


def api_session(
    user_agent: str, retries: int, retry_statuses: tuple[int, ...] = (500, 502, 503, 504)
) -> requests.Session:
    """A requests session with urllib3's backoff (honouring Retry-After) on 5xx."""
    session = requests.Session()
    retry = Retry(
        total=retries,
        backoff_factor=0.5,
        backoff_max=30,
        status_forcelist=retry_statuses,
        allowed_methods=None,
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.headers["User-Agent"] = user_agent
    return session


class SearchSource(Source):
    """Common paging, error and rate-limit handling of the image-search APIs."""

    label = ""

    def __init__(self, spec: models.PromptSearch, timeout: float, retries: int, user_agent: str) -> None:
        super().__init__()
        self.spec = spec
        self.timeout = timeout
        self.session = api_session(user_agent, retries)
        self.exhausted = False
        self._lock = threading.Lock()  # on_kept callbacks run in worker threads
        self._incomplete = 0

    def groups(self, shard_index: int, num_shards: int) -> Iterator[Group]:
        for index, prompt in enumerate(self.spec.prompts):
            if index % num_shards == shard_index:
                yield Group(prompt, self.spec.images_per_prompt, self._candidates(prompt))

    def _candidates(self, prompt: str) -> Iterator[Candidate]:
        raise NotImplementedError

    def guarded(self, prompt: str, build: Callable[[], Candidate | None]) -> Candidate | None:
        """`build()`'s candidate from one search result; a result without what it needs (a missing
        key, a value of the wrong type) is counted as skipped (`incomplete-result`), as any failing
        external item is, rather than ending the collection."""
        try:
            return build()
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            with self._lock:
                self._incomplete += 1
                number = self._incomplete
            return Candidate(
                key=candidate_key(self.name, prompt, "incomplete", str(number)),
                caption=prompt,
                source=self.name,
                group=prompt,
                skip="incomplete-result",
            )

    def call(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            with self._lock:
                return self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            # the message names the host only: query strings may carry keys
            host = requests.utils.urlparse(url).netloc
            raise RetryableError(f"{self.label} API at {host} cannot be reached: {type(error).__name__}") from None

    def check(self, response: requests.Response, variable: str = "") -> None:
        if response.status_code in (401, 403) and variable:
            raise SourceError(f"{self.label} refused the credentials (HTTP {response.status_code}): check {variable}")
        if response.status_code >= 500:
            raise RetryableError(f"{self.label} API failed with HTTP {response.status_code}")
        if response.status_code >= 400:
            raise SourceError(
                f"{self.label} API refused the request (HTTP {response.status_code}): {_api_message(response)}"
            )

    def stop(self, note: str) -> None:
        self.exhausted = True
        if note not in self.notes:
            self.notes.append(note)


def _api_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].replace("\n", " ")
    if isinstance(body, dict):
        error = body.get("error") or body.get("errors") or body.get("detail") or body
        if isinstance(error, dict):
            error = error.get("message") or error.get("info") or error
        return str(error)[:200].replace("\n", " ")
    return str(body)[:200]


class UnsplashSearch(SearchSource):
    """`GET /search/photos` (30 per page), `Authorization: Client-ID`, download pings, and the
    hourly budget from `X-Ratelimit-Remaining`."""

    name, label = "unsplash", "Unsplash"
    PER_PAGE = 30

    def __init__(self, spec: models.UnsplashSource, access_key: str, resolution: int, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.size = spec.size
        self.resolution = resolution
        self.session.headers.update({"Authorization": f"Client-ID {access_key}", "Accept-Version": "v1"})
        self.base = api_url("unsplash").rstrip("/")

    def _candidates(self, prompt: str) -> Iterator[Candidate]:
        page = 1
        while not self.exhausted:
            response = self.call(
                "GET", f"{self.base}/search/photos", params={"query": prompt, "page": page, "per_page": self.PER_PAGE}
            )
            if response.status_code in (403, 429) and "rate limit" in response.text.lower():
                self._spent(response)
                return
            self.check(response, "UNSPLASH_ACCESS_KEY")
            body = response.json()
            for photo in body.get("results", []):
                candidate = self.guarded(prompt, lambda photo=photo: self._candidate(prompt, photo))
                if candidate:
                    yield candidate
            if response.headers.get("X-Ratelimit-Remaining") == "0":
                self._spent(response)
                return
            if page >= int(body.get("total_pages", 0)) or not body.get("results"):
                return
            page += 1

    def _spent(self, response: requests.Response) -> None:
        limit = response.headers.get("X-Ratelimit-Limit", "?")
        self.stop(
            f"Unsplash rate limit spent ({limit} requests per hour): stopped with what was found; "
            "the budget refills within the hour"
        )

    def _candidate(self, prompt: str, photo: dict[str, Any]) -> Candidate:
        url = photo["urls"][self.size]
        if self.size == "raw":
            # imgix resizes raw on Unsplash's side: ask for the shorter side at our resolution
            side = "w" if photo.get("width", 0) <= photo.get("height", 0) else "h"
            url += ("&" if "?" in url else "?") + f"{side}={self.resolution}&fit=max&fm=jpg&q=90"
        user = photo.get("user", {})
        ping = photo.get("links", {}).get("download_location", "")
        return Candidate(
            key=candidate_key("unsplash", prompt, str(photo["id"])),
            caption=prompt,
            source="unsplash",
            group=prompt,
            url=url,
            license="Unsplash License",
            author=user.get("name", ""),
            page=photo.get("links", {}).get("html", "") or user.get("links", {}).get("html", ""),
            on_kept=(lambda: self._ping(ping)) if ping else None,
        )

    def _ping(self, download_location: str) -> None:
        """Unsplash's API guidelines: count a download by calling links.download_location."""
        with contextlib.suppress(RetryableError):  # the image is stored; a lost ping must not fail the run
            self.call("GET", download_location)


class GoogleSearch(SearchSource):
    """Custom Search JSON API, `searchType=image`: 10 results per request, 100 per query."""

    name, label = "google", "Google Custom Search"

    def __init__(self, spec: models.GoogleSource, api_key: str, engine_id: str, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.safe = "active" if spec.safe_search else "off"
        self.engine_id = engine_id
        # the key goes in a header (which Google APIs accept) so it never sits in a logged URL
        self.session.headers["X-Goog-Api-Key"] = api_key
        self.base = api_url("google").rstrip("/")

    def _candidates(self, prompt: str) -> Iterator[Candidate]:
        for start in range(1, 100, 10):
            if self.exhausted:
                return
            params = {
                "q": prompt,
                "cx": self.engine_id,
                "searchType": "image",
                "num": 10,
                "start": start,
                "safe": self.safe,
            }
            response = self.call("GET", f"{self.base}/customsearch/v1", params=params)
            if response.status_code == 429 or (response.status_code == 403 and "limit" in response.text.lower()):
                self.stop(
                    "Google Custom Search quota spent (100 queries per day on the free tier): stopped with what "
                    "was found"
                )
                return
            self.check(response, "GOOGLE_API_KEY and GOOGLE_CSE_ID")
            body = response.json()
            items = body.get("items", [])
            for item in items:
                candidate = self.guarded(
                    prompt,
                    lambda item=item: Candidate(
                        key=candidate_key("google", prompt, item["link"]),
                        caption=prompt,
                        source="google",
                        group=prompt,
                        url=str(item["link"]),
                        page=item.get("image", {}).get("contextLink", ""),
                    ),
                )
                if candidate:
                    yield candidate
            if not items or not body.get("queries", {}).get("nextPage"):
                return


class OpenverseSearch(SearchSource):
    """Openverse `GET /v1/images/` with license filters; OAuth client credentials if given."""

    name, label = "openverse", "Openverse"

    def __init__(
        self, spec: models.OpenverseSource, client_id: str = "", client_secret: str = "", **kwargs: Any
    ) -> None:
        super().__init__(spec, **kwargs)
        self.spec_ov = spec
        self.base = api_url("openverse").rstrip("/")
        self.credentials = (client_id, client_secret) if client_id and client_secret else None
        self.page_size = 20  # the anonymous maximum; authenticated clients may ask for more
        self._authorised = False

    def _authorise(self) -> None:
        if self._authorised or not self.credentials:
            return
        client_id, client_secret = self.credentials
        response = self.call(
            "POST",
            f"{self.base}/v1/auth_tokens/token/",
            data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret},
        )
        self.check(response, "OPENVERSE_CLIENT_ID and OPENVERSE_CLIENT_SECRET")
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        self.page_size = 50
        self._authorised = True

    def _candidates(self, prompt: str) -> Iterator[Candidate]:
        self._authorise()
        page = 1
        while not self.exhausted:
            params: dict[str, Any] = {"q": prompt, "page": page, "page_size": self.page_size}
            if self.spec_ov.license_type != "all":
                params["license_type"] = self.spec_ov.license_type
            if self.spec_ov.licenses:
                params["license"] = ",".join(self.spec_ov.licenses)
            response = self.call("GET", f"{self.base}/v1/images/", params=params)
            if response.status_code == 429:
                self.stop(
                    "Openverse rate limit reached: stopped with what was found (client credentials raise the limit)"
                )
                return
            if response.status_code in (400, 401) and page > 1:
                return  # past the page depth this client may read
            self.check(response, "OPENVERSE_CLIENT_ID and OPENVERSE_CLIENT_SECRET" if self.credentials else "")
            body = response.json()
            for item in body.get("results", []):
                candidate = self.guarded(prompt, lambda item=item: self._candidate(prompt, item))
                if candidate:
                    yield candidate
            if page >= int(body.get("page_count", 0)) or not body.get("results"):
                return
            page += 1

    def _candidate(self, prompt: str, item: dict[str, Any]) -> Candidate:
        license_name = " ".join(p for p in (item.get("license", ""), item.get("license_version", "")) if p)
        return Candidate(
            key=candidate_key("openverse", prompt, str(item["id"])),
            caption=prompt,
            source="openverse",
            group=prompt,
            url=str(item["url"]),
            license=license_name,
            author=item.get("creator") or "",
            page=item.get("foreign_landing_url") or "",
        )


_TAGS = re.compile(r"<[^>]+>")


class WikimediaSearch(SearchSource):
    """Commons through the MediaWiki API: file search as a generator, `imageinfo` with a
    thumbnail at our resolution (`iiurlwidth`) and `extmetadata` for license and author.
    Wikimedia's API etiquette asks for a descriptive User-Agent and serial requests."""

    name, label = "wikimedia", "Wikimedia Commons"
    PER_PAGE = 50

    def __init__(self, spec: models.WikimediaSource, resolution: int, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.resolution = resolution
        self.base = api_url("wikimedia")
        contact = spec.contact or "https://github.com/kubetune/kubetune"
        self.session.headers["User-Agent"] = (
            f"kubetune-collector/{__version__} ({contact}) python-requests/{requests.__version__}"
        )

    def _candidates(self, prompt: str) -> Iterator[Candidate]:
        params: dict[str, Any] = {
            "action": "query",
            "format": "json",
            "formatversion": "2",
            "generator": "search",
            "gsrsearch": f"{prompt} filetype:bitmap",
            "gsrnamespace": "6",
            "gsrlimit": self.PER_PAGE,
            "prop": "imageinfo",
            "iiprop": "url|size|mime|extmetadata",
            "iiurlwidth": self.resolution,
            "iiextmetadatafilter": "LicenseShortName|Artist|LicenseUrl",
        }
        while not self.exhausted:
            response = self.call("GET", self.base, params=params)
            self.check(response)
            body = response.json()
            if "error" in body:
                raise SourceError(f"Wikimedia API error: {body['error'].get('info', body['error'])}")
            pages = sorted(body.get("query", {}).get("pages", []), key=lambda p: p.get("index", 0))
            for page in pages:
                candidate = self.guarded(prompt, lambda page=page: self._candidate(prompt, page))
                if candidate:
                    yield candidate
            if "continue" not in body:
                return
            params.update(body["continue"])

    def _candidate(self, prompt: str, page: dict[str, Any]) -> Candidate | None:
        info = (page.get("imageinfo") or [None])[0]
        if not info or not info.get("url"):
            return None
        meta = info.get("extmetadata", {})
        return Candidate(
            key=candidate_key("wikimedia", prompt, page.get("title", info["url"])),
            caption=prompt,
            source="wikimedia",
            group=prompt,
            url=self._image_url(info),
            license=_TAGS.sub("", meta.get("LicenseShortName", {}).get("value", "")),
            author=clean_caption(_TAGS.sub("", meta.get("Artist", {}).get("value", ""))),
            page=info.get("descriptionurl", ""),
        )

    def _image_url(self, info: dict[str, Any]) -> str:
        """A thumbnail whose shorter side covers our resolution, else the original."""
        width, height = int(info.get("width", 0)), int(info.get("height", 0))
        thumb = info.get("thumburl", "")
        if not thumb or min(width, height) <= self.resolution:
            return str(info["url"])
        if int(info.get("thumbheight", 0)) >= self.resolution:
            return str(thumb)
        # landscape: iiurlwidth sized the width; Commons thumbnail URLs carry the width as
        # "/<N>px-<name>", so ask for the width that makes the height our resolution
        wanted = -(-self.resolution * width // height)
        marker = f"/{info.get('thumbwidth')}px-"
        return str(thumb.replace(marker, f"/{wanted}px-")) if marker in thumb else str(info["url"])


# ---------------------------------------------------------------------------------------------
# lists: URLs, a hub dataset, an image folder


class UrlList(Source):
    """JSON Lines, CSV or Parquet of url + caption, local or in S3, read as a stream."""

    name = "urls"

    def __init__(self, spec: models.UrlsSource) -> None:
        super().__init__()
        self.spec = spec
        fmt = spec.format
        if fmt == "auto":
            suffix = spec.uri.lower().rsplit(".", 1)[-1]
            fmt = {"jsonl": "jsonl", "json": "jsonl", "ndjson": "jsonl", "csv": "csv", "parquet": "parquet"}.get(
                suffix, ""
            )
            if not fmt:
                raise SourceError(
                    f"urls: cannot tell the format of {spec.uri} from its extension; set the format (jsonl, "
                    "csv, parquet)"
                )
        self.format = fmt

    def groups(self, shard_index: int, num_shards: int) -> Iterator[Group]:
        yield Group("", None, self._candidates(shard_index, num_shards))

    def _candidates(self, shard_index: int, num_shards: int) -> Iterator[Candidate]:
        with _local_copy(self.spec.uri) as path:
            for index, row in enumerate(self._rows(path)):
                if index % num_shards != shard_index:
                    continue
                url = str(row.get(self.spec.url_column) or "").strip()
                caption = clean_caption(row.get(self.spec.caption_column))
                yield Candidate(
                    key=candidate_key("urls", url, caption),
                    caption=caption,
                    source="urls",
                    url=url,
                    license=str(row.get("license") or ""),
                    author=str(row.get("author") or ""),
                )

    def _rows(self, path: Path) -> Iterator[dict[str, Any]]:
        """The rows; errors name the list, a line and a column, never the text there (the file
        may not be a URL list at all, and its content must not reach logs or pod status)."""
        columns = (self.spec.url_column, self.spec.caption_column)
        where = self.spec.uri
        try:
            if self.format == "jsonl":
                with open(path, encoding="utf-8") as handle:
                    for number, line in enumerate(handle, 1):
                        where = f"{self.spec.uri} line {number}"
                        if line.strip():
                            row = json.loads(line)
                            if not isinstance(row, dict):
                                raise SourceError(f"urls: line {number} of {self.spec.uri} is not a JSON object")
                            yield row
            elif self.format == "csv":
                with open(path, encoding="utf-8", newline="") as handle:
                    reader = csv.DictReader(handle)
                    _require_columns(reader.fieldnames or [], columns, self.spec.uri)
                    for row in reader:
                        where = f"{self.spec.uri} line {reader.line_num}"
                        yield row
            else:
                import pyarrow.parquet as pq

                parquet = pq.ParquetFile(path)
                _require_columns(parquet.schema_arrow.names, columns, self.spec.uri)
                for batch in parquet.iter_batches(batch_size=4096):
                    yield from batch.to_pylist()
        except json.JSONDecodeError as error:
            problem = f"column {error.colno} is not valid JSON: {error.msg}"
            raise SourceError(f"urls: {where} {problem}") from None
        except UnicodeDecodeError as error:
            raise SourceError(f"urls: {self.spec.uri} is not UTF-8 (byte {error.start})") from None
        except csv.Error:
            raise SourceError(f"urls: {where} is not valid csv") from None
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise SourceError(f"urls: cannot read {self.spec.uri}: {reason}") from None
        except Exception as error:  # pyarrow's errors quote what they could not parse
            if type(error).__module__.startswith("pyarrow"):
                raise SourceError(f"urls: {self.spec.uri} is not valid parquet") from None
            raise


def _require_columns(names: list[str], wanted: tuple[str, ...], uri: str) -> None:
    """The header is the file's content: only how many columns it has is said, not their names."""
    missing = [c for c in wanted if c not in names]
    if missing:
        raise SourceError(f"urls: {uri} has no column {missing[0]!r} ({len(names)} other columns)")


class _local_copy:
    """A local path for a local file, or a temporary download of an s3:// object."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        if not self.uri.startswith("s3://") and os.environ.get("KUBETUNE_FINETUNEJOB"):
            # in a pod of the operator: a "local" file is the pod's own (/proc/self/environ)
            raise SourceError("urls: in a FineTuneJob the list must be in S3 (s3://bucket/key)")
        if not self.uri.startswith("s3://"):
            path = Path(self.uri)
            if not path.is_file():
                raise SourceError(f"urls: {self.uri} does not exist")
            return path
        self.tmp = tempfile.TemporaryDirectory(prefix="kubetune-urls-")
        bucket_key = self.uri[len("s3://") :]
        parent, _, name = bucket_key.rpartition("/")
        path = Path(self.tmp.name) / name
        try:
            Store(f"s3://{parent}").download_file(name, path)
        except FileNotFoundError:
            raise SourceError(f"urls: {self.uri} does not exist") from None
        except StorageError as error:
            raise RetryableError(str(error)) from None
        return path

    def __exit__(self, *exc: object) -> None:
        if self.tmp:
            self.tmp.cleanup()


class HubDataset(Source):
    """A `datasets` dataset (hub id or local path), streamed so a subset costs only itself."""

    name = "huggingface"

    def __init__(self, spec: models.HuggingFaceSource, token: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.token = token or None

    def groups(self, shard_index: int, num_shards: int) -> Iterator[Group]:
        yield Group("", None, self._candidates(shard_index, num_shards))

    def _candidates(self, shard_index: int, num_shards: int) -> Iterator[Candidate]:
        import datasets
        from datasets.distributed import split_dataset_by_node

        spec = self.spec
        try:
            stream = datasets.load_dataset(
                spec.name, split=spec.split, streaming=True, revision=spec.revision or None, token=self.token
            )
        except Exception as error:  # datasets raises many types for "not found / not allowed"
            raise SourceError(
                f"huggingface: cannot open {spec.name} split {spec.split}: {str(error).splitlines()[0][:200]}"
            ) from None
        columns = stream.column_names or list((stream.features or {}).keys())
        for column in (spec.image_column, spec.caption_column):
            if columns and column not in columns:
                raise SourceError(f"huggingface: {spec.name} has no column {column!r} (columns: {name_list(columns)})")
        if isinstance((stream.features or {}).get(spec.image_column), datasets.Image):
            stream = stream.cast_column(spec.image_column, datasets.Image(decode=False))  # our own safe decoding
        if spec.max_samples:
            stream = stream.take(spec.max_samples)
        stream = split_dataset_by_node(stream, rank=shard_index, world_size=num_shards)
        for row in stream:
            yield self._candidate(row)

    def _candidate(self, row: dict[str, Any]) -> Candidate:
        value = row.get(self.spec.image_column)
        caption = clean_caption(row.get(self.spec.caption_column))
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            return Candidate(
                key=candidate_key("huggingface", value, caption), caption=caption, source="huggingface", url=value
            )
        data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
        if data is None and isinstance(value, dict) and value.get("path"):
            # a file path is read only inside a local dataset folder; a hub row's path must
            # not make the pod read its own files
            path = Path(os.path.realpath(value["path"]))
            folder = self.spec.name
            if not (os.path.isdir(folder) and path.is_relative_to(os.path.realpath(folder))):
                return Candidate(
                    key=candidate_key("huggingface", folder, str(path), caption),
                    caption=caption,
                    source="huggingface",
                    load=_unsafe_path,
                )
            data = path.read_bytes() if path.is_file() else None
        data = data or b""
        return Candidate(
            key=candidate_key("huggingface", self.spec.name, hashlib.sha256(data).hexdigest(), caption),
            caption=caption,
            source="huggingface",
            page=f"hf://datasets/{self.spec.name}",
            load=lambda: data,
        )


class ImageFolder(Source):
    """An existing imagefolder (local or s3://) with metadata.jsonl, validated and normalised."""

    name = "imagefolder"

    def __init__(self, spec: models.ImageFolderSource) -> None:
        super().__init__()
        self.spec = spec

    def groups(self, shard_index: int, num_shards: int) -> Iterator[Group]:
        yield Group("", None, self._candidates(shard_index, num_shards))

    def _candidates(self, shard_index: int, num_shards: int) -> Iterator[Candidate]:
        store, metadata = self._locate()
        folder = metadata.rpartition("/")[0]
        for index, line in enumerate(io.StringIO(store.read_bytes(metadata).decode("utf-8"))):
            if not line.strip() or index % num_shards != shard_index:
                continue
            try:
                row = json.loads(line)
                file_name = str(row["file_name"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SourceError(
                    f"imagefolder: line {index + 1} of {store.uri_of(metadata)} has no file_name"
                ) from None
            key = f"{folder}/{file_name}" if folder else file_name
            caption = clean_caption(row.get("text", row.get("caption")))
            yield (
                Candidate(
                    key=candidate_key("imagefolder", store.uri_of(key)),
                    caption=caption,
                    source=str(row.get("source") or "imagefolder"),
                    url=str(row.get("url") or ""),
                    license=str(row.get("license") or ""),
                    author=str(row.get("author") or ""),
                    page=str(row.get("page") or ""),
                    load=lambda key=key: _read_image(store, key),  # type: ignore[misc]
                )
                if is_safe_file_name(file_name)
                else Candidate(
                    key=candidate_key("imagefolder", store.uri_of(folder), file_name),
                    caption=caption,
                    source="imagefolder",
                    load=_unsafe_path,
                )
            )

    def _locate(self) -> tuple[Store, str]:
        store = Store(self.spec.uri)
        try:
            for candidate in ("metadata.jsonl", "train/metadata.jsonl"):
                if store.exists(candidate):
                    return store, candidate
        except StorageError as error:
            raise RetryableError(str(error)) from None
        raise SourceError(f"imagefolder: no metadata.jsonl or train/metadata.jsonl in {self.spec.uri}")


def _unsafe_path() -> bytes:
    raise Skip("unsafe-path", "absolute, or with '..': outside the dataset")


def _read_image(store: Store, key: str) -> bytes:
    try:
        return store.read_bytes(key)
    except FileNotFoundError:
        raise Skip("no-image", key) from None


def open_source(dataset: models.Dataset, keys: dict[str, str], timeout: float, retries: int) -> Source:
    """The source named by `dataset`, with keys taken from `keys` (read from the environment,
    named by contracts.SOURCE_SECRET_ENV)."""
    search = {"timeout": timeout, "retries": retries, "user_agent": f"kubetune-collector/{__version__}"}
    name = dataset.source_name
    variables = SOURCE_SECRET_ENV.get(name, {})

    def key(field_name: str) -> str:
        return keys.get(variables[field_name], "")

    if name == "unsplash":
        access_key = key("access_key_secret_ref")
        return UnsplashSearch(dataset.unsplash, access_key, dataset.resolution, **search)  # type: ignore[arg-type]
    if name == "google":
        api_key, engine = key("api_key_secret_ref"), key("search_engine_id_secret_ref")
        return GoogleSearch(dataset.google, api_key, engine, **search)  # type: ignore[arg-type]
    if name == "openverse":
        client_id, client_secret = key("client_id_secret_ref"), key("client_secret_secret_ref")
        return OpenverseSearch(dataset.openverse, client_id, client_secret, **search)  # type: ignore[arg-type]
    if name == "wikimedia":
        return WikimediaSearch(dataset.wikimedia, dataset.resolution, **search)  # type: ignore[arg-type]
    if name == "urls":
        return UrlList(dataset.urls)  # type: ignore[arg-type]
    if name == "huggingface":
        return HubDataset(dataset.huggingface, key("token_secret_ref"))  # type: ignore[arg-type]
    return ImageFolder(dataset.imagefolder)  # type: ignore[arg-type]
