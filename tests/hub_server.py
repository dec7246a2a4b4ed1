"""A tiny in-memory Hugging Face Hub on 127.0.0.1, for the real huggingface_hub client.

It speaks the part of the Hub API that ``HfApi.create_repo``, ``create_branch``,
``create_commit`` (validate-yaml, preupload, the NDJSON commit) and
``snapshot_download`` (model info, tree, resolve HEAD/GET) use, as read from
huggingface_hub's source.  Files are always "regular" (inline base64 in the
commit, served by ``resolve``), and no response carries Xet headers, so the
client never takes its LFS or Xet paths.  Every request is recorded in
``requests`` for tests to check what reached the server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_sha(content: bytes) -> str:
    """The git object id of a blob, which the Hub uses as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    """One model repo: commits (sha -> files), branches (name -> sha), pull requests."""

    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    pulls: list[str] = field(default_factory=list)  # refs/pr/<n> names

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Request:
    """What the server saw of one request (the Authorization header is kept only as valid/invalid/absent)."""

    method: str
    path: str
    query: dict[str, list[str]]
    auth: str  # "valid", "invalid" or "none"
    body: bytes


class HubServer:
    """The fake Hub: ``start()``, point ``HF_ENDPOINT`` at ``url``, ``stop()``.

    Args:
        token: The one token the server accepts for writes and private reads.
    """

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()  # open keep-alive connections, closed by stop()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, as if the network went away: refuse new connections, drop open ones."""
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            for connection in self._connections:
                connection.shutdown(socket.SHUT_RDWR)
            self._connections.clear()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a branch, ``refs/pr/N`` or a commit)."""
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def set_files(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> None:
        """Commit ``files`` (the whole tree) to ``branch``, as another client would have."""
        with self._lock:
            repo = self.repos[repo_id]
            repo.branches[branch] = self._commit(repo, repo.branches.get(branch), files, "set by the test")

    # -- the API, called by the handler with the lock held -------------------------------

    def create_repo(self, payload: dict) -> tuple[int, dict]:
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        first = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        repo = Repo(private=payload.get("visibility") == "private")
        sha = self._commit(repo, None, first)
        repo.branches["main"] = sha
        self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def create_branch(self, repo: Repo, branch: str, payload: dict) -> tuple[int, dict]:
        if branch in repo.branches:
            return 409, {"error": f"Reference refs/heads/{branch} already exists"}
        start = repo.resolve(payload.get("startingPoint") or "main")
        repo.branches[branch] = start
        return 200, {}

    def commit(self, repo_id: str, repo: Repo, revision: str, lines: list[dict], create_pr: bool):
        parent = repo.resolve(revision)
        if parent is None:
            return None
        files = dict(repo.commits[parent])
        header = {}
        for line in lines:
            if line["key"] == "header":
                header = line["value"]
            elif line["key"] == "file" and line["value"]["encoding"] == "base64":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            else:
                raise ValueError(f"this test Hub takes regular files only, got {line['key']}")
        sha = self._commit(repo, parent, files, header.get("summary", ""))
        answer = {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
        if create_pr:
            repo.pulls.append(f"refs/pr/{len(repo.pulls) + 1}")
            repo.branches[repo.pulls[-1]] = sha
            answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{len(repo.pulls)}"
        else:
            repo.branches[unquote(revision)] = sha
        return answer

    def _commit(self, repo: Repo, parent: Optional[str], files: dict[str, bytes], message: str = "") -> str:
        tree = sorted((path, git_blob_sha(content)) for path, content in files.items())
        sha = hashlib.sha1(json.dumps([parent, message, tree]).encode()).hexdigest()
        repo.commits[sha] = files
        return sha


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def setup(self) -> None:
            super().setup()
            with hub._lock:
                hub._connections.add(self.connection)

        def finish(self) -> None:
            with hub._lock:
                hub._connections.discard(self.connection)
            super().finish()

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def do_POST(self) -> None:
            self._serve(send_body=True)

        def _serve(self, *, send_body: bool) -> None:
            self.send_body = send_body
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            auth = self.headers.get("Authorization")
            self.auth = "none" if auth is None else "valid" if auth == f"Bearer {hub.token}" else "invalid"
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            with hub._lock:
                hub.requests.append(Request(self.command, url.path, parse_qs(url.query), self.auth, body))
                if self.auth == "invalid":  # what the Hub answers a rejected token, on any route
                    message = "Invalid credentials in Authorization header"
                    return self._reply(401, {"error": message}, headers={"X-Error-Message": message})
                self._route(parts, parse_qs(url.query), body)

        def _route(self, parts: list[str], query: dict, body: bytes) -> None:
            if self.command == "POST" and parts == ["api", "repos", "create"]:
                if self.auth != "valid":
                    return self._reply(401, {"error": "You must be authenticated"})
                return self._reply(*hub.create_repo(json.loads(body)))
            if self.command == "POST" and parts == ["api", "validate-yaml"]:
                front_matter = json.loads(body)["content"].split("---")[1]
                try:
                    yaml.safe_load(front_matter)
                except yaml.YAMLError as e:
                    return self._reply(400, {"errors": [{"message": str(e)}], "warnings": []})
                return self._reply(200, {"errors": [], "warnings": []})
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                return self._api(f"{parts[2]}/{parts[3]}", parts[4:], query, body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            return self._reply(404, {"error": "Not Found"})

        def _repo(self, repo_id: str) -> Optional[Repo]:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and self.auth != "valid"):
                self._reply(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
                return None
            return repo

        def _api(self, repo_id: str, rest: list[str], query: dict, body: bytes) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return None
            # Revisions come URL-quoted in one segment ("refs%2Fpr%2F1"), except a new branch's name.
            action = rest[0] if rest else "revision"
            revision = ("/".join(rest[1:]) if action == "branch" else rest[1]) if len(rest) > 1 else "main"
            writing = action in ("preupload", "commit", "branch")
            if writing and self.auth != "valid":
                return self._reply(401, {"error": "You must be authenticated to write"})
            if action == "branch":
                return self._reply(*hub.create_branch(repo, revision, json.loads(body or b"{}")))
            if action == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply(200, {"files": modes})
            if action == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                answer = hub.commit(repo_id, repo, revision, lines, create_pr=query.get("create_pr") == ["1"])
                return self._reply(200, answer) if answer else self._revision_not_found()
            sha = repo.resolve(revision)
            if sha is None:
                return self._revision_not_found()
            files = repo.commits[sha]
            if action == "revision":
                siblings = [{"rfilename": p} for p in sorted(files)]
                info = {"id": repo_id, "sha": sha, "private": repo.private, "siblings": siblings}
                return self._reply(200, info)
            if action == "tree":
                # No "lfs" and no "xetHash" keys: regular git files, downloaded over plain HTTP.
                entries = [
                    {"type": "file", "oid": git_blob_sha(content), "size": len(content), "path": path}
                    for path, content in sorted(files.items())
                ]
                folders = sorted({path.rsplit("/", 1)[0] for path in files if "/" in path})
                entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
                return self._reply(200, entries)
            return self._reply(404, {"error": "Not Found"})

        def _resolve(self, repo_id: str, revision: str, path: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return None
            sha = repo.resolve(revision)
            if sha is None:
                return self._revision_not_found()
            content = repo.commits[sha].get(path)
            if content is None:
                return self._reply(
                    404,
                    {"error": "Entry not found"},
                    headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha},
                )
            headers = {
                "ETag": f'"{git_blob_sha(content)}"',
                "X-Repo-Commit": sha,
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
            }
            return self._reply(200, content, headers=headers)

        def _revision_not_found(self) -> None:
            self._reply(404, {"error": "Invalid rev id"}, headers={"X-Error-Code": "RevisionNotFound"})

        def _reply(self, status: int, payload, headers: Optional[dict] = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.send_body:
                self.wfile.write(data)

    return Handler
