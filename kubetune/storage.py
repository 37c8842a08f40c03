"""One interface for "a local folder or an s3:// prefix", shared by collector, trainer and operator.

S3 goes through one boto3 client per store (boto3 clients are thread-safe; sessions are not), with
the endpoint taken from `AWS_ENDPOINT_URL` or the spec, so the same code runs against AWS, MinIO
and moto. Large files go through boto3's managed transfer (multipart, parallel parts).

Writes are atomic for readers: a local file is written to a temporary name and renamed; an S3 PUT
is atomic by itself. Completeness of a multi-file artifact (dataset, checkpoint) is marked by a
manifest written last; see `write_json`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from kubetune.api.models import Storage


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI (never credentials)."""


def storage_env(storage: Storage) -> dict[str, str]:
    """The environment that points boto3 (and this module) at `spec.storage`'s endpoint and region,
    for the pods the operator makes and the processes `kubetune run` starts. Credentials are not
    here: they come from a Secret (pods) or the caller's own environment."""
    env = {}
    if storage.endpoint:
        env["AWS_ENDPOINT_URL"] = storage.endpoint
    if storage.region:
        env["AWS_REGION"] = storage.region
        env["AWS_DEFAULT_REGION"] = storage.region  # the name older boto3 and other tools read
    return env


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join URI or path parts with single slashes: join("s3://b/p/", "x", "y.json")."""
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


@dataclass
class Store:
    """A local folder or an `s3://bucket/prefix`, addressed by keys relative to it."""

    uri: str
    endpoint: str | None = None
    region: str | None = None
    _client: Any = field(default=None, repr=False)
    credentials: tuple[str, str] | None = field(default=None, repr=False)  # (key id, secret); else the SDK's chain

    # -- construction --------------------------------------------------------------------------

    @property
    def is_s3(self) -> bool:
        return is_s3(self.uri)

    def child(self, *parts: str) -> Store:
        return Store(join(self.uri, *parts), self.endpoint, self.region, self._client, self.credentials)

    def uri_of(self, key: str = "") -> str:
        return join(self.uri, key)

    @cached_property
    def _bucket_prefix(self) -> tuple[str, str]:
        parsed = urlparse(self.uri)
        return parsed.netloc, parsed.path.strip("/")

    def _s3_key(self, key: str) -> str:
        prefix = self._bucket_prefix[1]
        return "/".join(p for p in (prefix, key.strip("/")) if p)

    def _path(self, key: str) -> Path:
        return Path(self.uri) / key

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self.endpoint, self.region, credentials=self.credentials)
        return self._client

    # -- reading -------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        if not self.is_s3:
            return self._path(key).exists()
        try:
            self.client.head_object(Bucket=self._bucket_prefix[0], Key=self._s3_key(key))
            return True
        except self.client.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot read {self.uri_of(key)}: {_reason(error)}") from None

    def read_bytes(self, key: str) -> bytes:
        try:
            if not self.is_s3:
                return self._path(key).read_bytes()
            response = self.client.get_object(Bucket=self._bucket_prefix[0], Key=self._s3_key(key))
            return response["Body"].read()  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise FileNotFoundError(self.uri_of(key)) from None
        except Exception as error:  # botocore raises a family of classes; report them alike
            if _is_not_found(error):
                raise FileNotFoundError(self.uri_of(key)) from None
            raise StorageError(f"cannot read {self.uri_of(key)}: {_reason(error)}") from None

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix` (recursively), relative to this store, in lexical order."""
        if not self.is_s3:
            root = self._path(prefix)
            if root.is_file():
                yield prefix
                return
            if not root.exists():
                return
            base = Path(self.uri)
            for path in sorted(root.rglob("*")):
                if path.is_file() and not path.name.startswith(".tmp-"):
                    yield path.relative_to(base).as_posix()
            return
        bucket, _ = self._bucket_prefix
        wanted = self._s3_key(prefix)  # a key, or a "folder" of keys
        strip = len(self._s3_key("")) + 1 if self._s3_key("") else 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=wanted):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if not wanted or key == wanted or key.startswith(wanted.rstrip("/") + "/"):
                        yield key[strip:]
        except Exception as error:
            raise StorageError(f"cannot list {self.uri_of(prefix)}: {_reason(error)}") from None

    def versions(self, prefix: str = "") -> dict[str, str]:
        """Each key under `prefix` (as `list` gives them) with a version of its content: size and
        ETag on S3, size and modification time locally. One listing: no object is read."""
        if not self.is_s3:
            base, root = Path(self.uri), self._path(prefix)
            paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
            return {
                p.relative_to(base).as_posix(): f"{(st := p.stat()).st_size}:{st.st_mtime_ns}"
                for p in paths
                if p.is_file() and not p.name.startswith(".tmp-")
            }
        bucket, _ = self._bucket_prefix
        wanted = self._s3_key(prefix)
        strip = len(self._s3_key("")) + 1 if self._s3_key("") else 0
        found = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=wanted):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if not wanted or key == wanted or key.startswith(wanted.rstrip("/") + "/"):
                        found[key[strip:]] = f"{item['Size']}:{item.get('ETag', '')}"
        except Exception as error:
            raise StorageError(f"cannot list {self.uri_of(prefix)}: {_reason(error)}") from None
        return found

    def keys_starting_with(self, prefix: str) -> list[str]:
        """Keys (relative to this store, recursively, in lexical order) whose text begins with
        `prefix`, which need not be a folder: `checkpoint` matches `checkpoint-5/unet/x` and
        `checkpoints/step-1/manifest.json`. On S3, one listing of exactly those keys; locally, only
        the matching entries of `prefix`'s folder are walked."""
        if not self.is_s3:
            base = Path(self.uri)
            parent, _, start = prefix.rpartition("/")
            folder = self._path(parent)
            if not folder.is_dir():
                return []
            keys = []
            for entry in folder.iterdir():
                if not entry.name.startswith(start):
                    continue
                paths = [entry] if entry.is_file() else entry.rglob("*")
                keys += [
                    p.relative_to(base).as_posix() for p in paths if p.is_file() and not p.name.startswith(".tmp-")
                ]
            return sorted(keys)
        bucket, base_key = self._bucket_prefix
        wanted = f"{base_key}/{prefix}" if base_key else prefix
        strip = len(base_key) + 1 if base_key else 0
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=wanted):
                keys += [item["Key"][strip:] for item in page.get("Contents", [])]
        except Exception as error:
            raise StorageError(f"cannot list {self.uri_of(prefix)}*: {_reason(error)}") from None
        return keys

    def download_file(self, key: str, destination: str | Path) -> None:
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(f".tmp-{destination.name}.{os.getpid()}")
        try:
            if self.is_s3:
                self.client.download_file(self._bucket_prefix[0], self._s3_key(key), str(tmp), Config=transfer_config())
            else:
                shutil.copyfile(self._path(key), tmp)
            os.replace(tmp, destination)
        except Exception as error:
            tmp.unlink(missing_ok=True)
            if _is_not_found(error) or isinstance(error, FileNotFoundError):
                raise FileNotFoundError(self.uri_of(key)) from None
            raise StorageError(f"cannot download {self.uri_of(key)}: {_reason(error)}") from None

    def download_tree(self, prefix: str, destination: str | Path) -> list[str]:
        """Copy every key under `prefix` into `destination`, keeping relative paths."""
        keys = list(self.list(prefix))
        base = prefix.strip("/")
        for key in keys:
            relative = key[len(base) :].lstrip("/") if base else key
            self.download_file(key, Path(destination) / relative)
        return keys

    # -- writing -------------------------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        try:
            if self.is_s3:
                extra = {"ContentType": content_type} if content_type else {}
                self.client.put_object(Bucket=self._bucket_prefix[0], Key=self._s3_key(key), Body=data, **extra)
                return
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as error:
            raise StorageError(f"cannot write {self.uri_of(key)}: {error.strerror or error}") from None
        except Exception as error:
            raise StorageError(f"cannot write {self.uri_of(key)}: {_reason(error)}") from None

    def write_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """Write `key` only when it does not exist; False when it already did. S3: a conditional
        PUT (`If-None-Match: *`); a store that does not support it gets a check, then a PUT (a
        narrow race: callers read the key back). Locally, an exclusive create."""
        if not self.is_s3:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with path.open("xb") as handle:
                    handle.write(data)
            except FileExistsError:
                return False
            except OSError as error:
                raise StorageError(f"cannot write {self.uri_of(key)}: {error.strerror or error}") from None
            return True
        extra = {"ContentType": content_type} if content_type else {}
        try:
            self.client.put_object(
                Bucket=self._bucket_prefix[0], Key=self._s3_key(key), Body=data, IfNoneMatch="*", **extra
            )
            return True
        except Exception as error:
            code = str((getattr(error, "response", None) or {}).get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            if code not in ("NotImplemented", "501", "InvalidArgument", "InvalidRequest"):
                raise StorageError(f"cannot write {self.uri_of(key)}: {_reason(error)}") from None
        if self.exists(key):
            return False
        self.write_bytes(key, data, content_type)
        return True

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n", "application/json")

    def upload_file(self, source: str | Path, key: str) -> None:
        try:
            if self.is_s3:
                self.client.upload_file(
                    str(source), self._bucket_prefix[0], self._s3_key(key), Config=transfer_config()
                )
                return
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, path)
        except Exception as error:
            raise StorageError(f"cannot upload {source} to {self.uri_of(key)}: {_reason(error)}") from None

    def upload_tree(self, source: str | Path, prefix: str = "") -> list[str]:
        """Upload every file under the local folder `source` to `prefix`, keeping relative paths."""
        keys = []
        for path in sorted(Path(source).rglob("*")):
            if path.is_file():
                key = (
                    join(prefix, path.relative_to(source).as_posix()) if prefix else path.relative_to(source).as_posix()
                )
                self.upload_file(path, key)
                keys.append(key)
        return keys

    def delete(self, key: str) -> None:
        if self.is_s3:
            self.client.delete_object(Bucket=self._bucket_prefix[0], Key=self._s3_key(key))
        else:
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        if not self.is_s3:
            target = self._path(prefix)
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            return
        keys = [self._s3_key(k) for k in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self._bucket_prefix[0], Delete={"Objects": batch, "Quiet": True})


def s3_client(
    endpoint: str | None = None,
    region: str | None = None,
    max_pool_connections: int = 64,
    credentials: tuple[str, str] | None = None,
) -> Any:
    """A boto3 S3 client that works with AWS, MinIO and moto alike.

    Checksums only when required: boto3 1.36+ sends new checksum headers by default, and several
    S3-compatible stores reject them. Retries in adaptive mode handle throttling (SlowDown).
    """
    from botocore.config import Config

    config = Config(
        max_pool_connections=max_pool_connections,
        retries={"max_attempts": 8, "mode": "adaptive"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if endpoint or os.environ.get("AWS_ENDPOINT_URL") else {},
    )
    keys = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]} if credentials else {}
    with _SESSION_LOCK:  # creating clients from one session is not thread-safe; using them is
        return _session().client(
            "s3",
            endpoint_url=endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None,
            region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=config,
            **keys,
        )


_SESSION_LOCK = threading.Lock()


def _session() -> Any:
    """A session of its own (credentials resolve from the environment as they are now) that shares
    one loader of the service models: each session loading its own copy cost about 12 MiB."""
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    core.register_component("data_loader", _shared_loader())
    return boto3.session.Session(botocore_session=core)


@functools.cache
def _shared_loader() -> Any:
    import botocore.session

    return botocore.session.get_session().get_component("data_loader")


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 * 1024 * 1024, max_concurrency=8)


def _is_not_found(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _reason(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    err = response.get("Error") or {}
    if err:
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip(": ")
    return str(error).splitlines()[0] if str(error) else type(error).__name__
