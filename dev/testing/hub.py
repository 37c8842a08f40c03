"""A stand-in of the Hugging Face Hub's HTTP API for model pushes, on 127.0.0.1.

Built from the requests huggingface_hub's HfApi sends and the answers it parses (see its
hf_api.py / _commit_api.py): `GET /api/whoami-v2`, `POST /api/repos/create` (409 with the repo's
`url` when it exists), `GET /api/models/{repo}` (repo_info), `POST /api/models/{repo}/branch/{name}`,
`POST /api/validate-yaml` (a README.md in a commit), `POST /api/models/{repo}/preupload/{revision}`,
`POST /api/models/{repo}/commit/{revision}` (ndjson: a header line, then `file` lines with
base64 content, `deletedFile` and `deletedFolder` lines) and `GET /api/models/{repo}/tree/{revision}`
(list_repo_tree). Preupload answers "regular" for every file, so commits carry the files inline
and no LFS or Xet storage is needed. Tokens: `Authorization: Bearer <token>`; an unknown token gets
401, a read-only token 403 on writes, as the Hub answers.

Point the client at it with HF_ENDPOINT=<stand_in.base> (and HF_HUB_OFFLINE=0).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import yaml

from kubetune.dev.testing.webapis import Reply, Request, StandIn


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[str] = field(default_factory=list)


class Hub:
    """`Hub(tokens={"hf_write": ("alice", True)})`: token -> (user, may write)."""

    def __init__(self, tokens: dict[str, tuple[str, bool]]) -> None:
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.failures: list[int] = []  # status codes the next commits answer with, first first
        self.server = StandIn()
        self.server.route("/api/*", self._api)

    def __enter__(self) -> Hub:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    @property
    def base(self) -> str:
        return self.server.base

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[revision]

    # -- routing -----------------------------------------------------------------------------

    def _api(self, request: Request) -> Reply:
        path = request.path
        user = self._user(request)
        if path == "/api/whoami-v2":
            if user is None:
                return _error(401, "Invalid credentials in Authorization header")
            return Reply.json({"type": "user", "name": user[0], "orgs": [], "auth": {"type": "access_token"}})
        if path == "/api/validate-yaml" and request.method == "POST":
            return self._validate_yaml(json.loads(request.body)["content"])
        if path == "/api/repos/create" and request.method == "POST":
            return self._create(request, user)
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit|branch|tree)/([^/]+)(/.+)?)?", path)
        if not match:
            return _error(404, "Sorry, we can't find the page you are looking for.")
        repo_id, action, revision = match.group(1), match.group(2), unquote(match.group(3) or "main")
        if match.group(4) and action != "tree":
            return _error(404, "Sorry, we can't find the page you are looking for.")
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or not repo_id.startswith(user[0] + "/"))):
            if user is None:
                return _error(401, "Invalid credentials in Authorization header")
            return _error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        if action is None:
            return Reply.json({"id": repo_id, "private": repo.private, "sha": (repo.commits or ["0" * 40])[-1]})
        if action == "tree":
            return self._tree(repo, revision, unquote((match.group(4) or "/")[1:]), request)
        if user is None:
            return _error(401, "Invalid credentials in Authorization header")
        if not user[1] or not repo_id.startswith(user[0] + "/"):
            return _error(403, "You don't have the rights to create a commit in this repository")
        if action == "branch":
            if revision in repo.branches:
                return _error(409, "Reference already exists")
            repo.branches[revision] = dict(repo.branches["main"])
            return Reply.json({})
        if revision not in repo.branches:
            return _error(404, "Invalid rev id", {"X-Error-Code": "RevisionNotFound"})
        if action == "preupload":
            files = json.loads(request.body)["files"]
            return Reply.json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        return self._commit(request, repo, revision)

    def _user(self, request: Request) -> tuple[str, bool] | None:
        auth = request.header("Authorization")
        return self.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None

    def _create(self, request: Request, user: tuple[str, bool] | None) -> Reply:
        if user is None:
            return _error(401, "Invalid credentials in Authorization header")
        body = json.loads(request.body)
        repo_id = f"{body.get('organization') or user[0]}/{body['name']}"
        if not user[1] or not repo_id.startswith(user[0] + "/"):
            return _error(403, "You don't have the rights to create a model under the namespace")
        url = f"{self.base}/{repo_id}"
        if repo_id in self.repos:
            return Reply.json({"error": "You already created this model repo", "url": url}, 409)
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.repos[repo_id] = Repo(repo_id, private)
        return Reply.json({"url": url, "name": repo_id})

    def _validate_yaml(self, content: str) -> Reply:
        """The Hub refuses a card whose base_model is not a model id (a local path, an s3:// URI)."""
        meta = yaml.safe_load(content.split("---", 2)[1]) if content.startswith("---") else {}
        bases = meta.get("base_model") if isinstance(meta, dict) else None
        for base in [bases] if isinstance(bases, str) else bases or []:
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
                return _error(
                    400, f'"base_model" with value "{base}" is not valid. Use a model id from https://hf.co/models.'
                )
        return Reply.json({"warnings": []})

    def _commit(self, request: Request, repo: Repo, revision: str) -> Reply:
        if self.failures:
            return _error(self.failures.pop(0), "Internal Error")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return _error(400, "the first line must be the header")
        branch = repo.branches[revision]
        for line in lines[1:]:
            value: dict[str, Any] = line["value"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                branch[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                branch.pop(value["path"], None)
            elif line["key"] == "deletedFolder":
                for name in [name for name in branch if name.startswith(value["path"].rstrip("/") + "/")]:
                    del branch[name]
            else:  # lfsFile and the like: this stand-in never asked for LFS
                return _error(400, f"unexpected commit operation {line['key']}")
        oid = hashlib.sha1(request.body + str(len(repo.commits)).encode()).hexdigest()
        repo.commits.append(oid)
        url = f"{self.base}/{repo.repo_id}/commit/{oid}"
        return Reply.json({"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

    def _tree(self, repo: Repo, revision: str, folder: str, request: Request) -> Reply:
        """`GET .../tree/{revision}[/{path}]` (list_repo_tree): the entries under `folder`, one level
        (or all files with `recursive=True`), as {type, path, oid[, size]}; one page, no Link header."""
        if revision not in repo.branches:
            return _error(404, "Invalid rev id", {"X-Error-Code": "RevisionNotFound"})
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        recursive = request.query.get("recursive", "").lower() == "true"
        entries: dict[str, dict[str, Any]] = {}
        for name, content in sorted(repo.branches[revision].items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if recursive or "/" not in rest:
                oid = hashlib.sha1(content).hexdigest()
                entries[name] = {"type": "file", "path": name, "oid": oid, "size": len(content)}
            else:
                directory = prefix + rest.split("/")[0]
                entries[directory] = {"type": "directory", "path": directory, "oid": "0" * 40}
        if prefix and not entries:
            return _error(404, f"{folder} does not exist on {revision}", {"X-Error-Code": "EntryNotFound"})
        return Reply.json(list(entries.values()))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply.json({"error": message}, status, headers)
