"""The owner marker of a storage prefix (`owner.json`, contracts.StorageOwner).

A FineTuneJob's pods know their job's UID (layout.OWNER_UID_ENV, set by the operator). The first
of them to write to `storage.uri` claims it: the marker is written only when absent, then read
back. A pod whose UID differs from the marker's refuses the prefix before it writes or deletes
anything (exit code STORAGE_OWNED); the operator checks the marker before it creates pods. Without a
UID (`kubetune train`/`kubetune collect` by hand) nothing is claimed nor checked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timezone

from pydantic import ValidationError

from kubetune.api.contracts import StorageOwner, problem
from kubetune.api.layout import OWNER_FILE, OWNER_NAME_ENV, OWNER_NAMESPACE_ENV, OWNER_UID_ENV
from kubetune.storage import Store


class StorageOwnedError(RuntimeError):
    """The prefix belongs to another FineTuneJob (or its marker cannot be read): a one-line
    message naming storage.uri and the owner; exit with ExitCode.STORAGE_OWNED."""


def owner_from_env(env: Mapping[str, str] | None = None) -> StorageOwner | None:
    """This pod's FineTuneJob, from the environment the operator (or `kubetune run`) sets; None
    when no UID is set."""
    env = os.environ if env is None else env
    uid = env.get(OWNER_UID_ENV, "")
    if not uid:
        return None
    return StorageOwner(
        namespace=env.get(OWNER_NAMESPACE_ENV, ""),
        name=env.get(OWNER_NAME_ENV, ""),
        uid=uid,
        created_at=datetime.now(timezone.utc).replace(microsecond=0),
    )


def read_owner(store: Store) -> StorageOwner | None:
    """The marker at `store`; None when there is none. StorageOwnedError when it is not one (a
    prefix with an unreadable marker is refused, never taken over)."""
    try:
        return StorageOwner.model_validate_json(store.read_bytes(OWNER_FILE))
    except FileNotFoundError:
        return None
    except ValidationError as error:
        raise StorageOwnedError(
            f"storage.uri {store.uri}: {OWNER_FILE} is not an owner marker ({problem(error)[:200]}); "
            f"delete it to reuse this prefix"
        ) from None


def owned_message(uri: str, owner: StorageOwner) -> str:
    """The one line that says `uri` belongs to `owner`, and how to reuse it deliberately."""
    return (
        f"storage.uri {uri} belongs to FineTuneJob {owner.job} (uid {owner.uid}); use another storage.uri, "
        f"or delete {uri.rstrip('/')}/{OWNER_FILE} to reuse the prefix deliberately"
    )


def check(store: Store, me: StorageOwner | None) -> StorageOwner | None:
    """Raise StorageOwnedError when `store` is marked as another job's; the marker (or None)."""
    owner = read_owner(store)
    if me is not None and owner is not None and owner.uid != me.uid:
        raise StorageOwnedError(owned_message(store.uri, owner))
    return owner


def claim(store: Store, me: StorageOwner | None) -> None:
    """Make `store` this job's (write the marker when absent, read it back) or raise
    StorageOwnedError naming its owner. No-op without an owner (`me` None)."""
    if me is None:
        return
    if check(store, me) is not None:
        return  # ours already
    store.write_if_absent(OWNER_FILE, me.to_json(), "application/json")
    check(store, me)  # another pod of another job may have won the race
