"""A Hugging Face Hub-compatible HTTP endpoint on 127.0.0.1 (standard library only), for tests.

It serves the routes that `huggingface_hub` (and through it transformers and peft) use to create a repository,
commit files to it and read them back: `POST /api/repos/create`, `POST /api/validate-yaml`,
`POST /api/{type}s/{repo}/preupload/{rev}`, `POST .../commit/{rev}` (NDJSON), `POST .../paths-info/{rev}`,
`GET /api/{type}s/{repo}[/revision/{rev}]`, `GET .../tree/{rev}[/{path}]`, `GET .../commits/{rev}`,
`PUT .../settings` (visibility), `GET /api/whoami-v2` and `GET|HEAD /[{type}s/]{repo}/resolve/{rev}/{path}`.

Behaviour follows the Hub where clients depend on it: writes need a known bearer token (401 "Invalid credentials in
Authorization header" otherwise), a missing file answers 404 with `X-Error-Code: EntryNotFound` (transformers probes
optional files such as `adapter_config.json` and expects exactly that), a missing repository or revision answers
`RepoNotFound` / `RevisionNotFound`, a private repository is invisible without a token, and `ETag` is the git blob id.
Limits: one branch (`main`), files are kept in memory and always uploaded in "regular" mode (no LFS or Xet), no
pull requests.

    with LocalHub(tokens={"hf_test"}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


REPO_TYPES = ("model", "dataset", "space")
BRANCH = "main"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API_ROUTE = re.compile(
    rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}"
    r"(?:/(?P<action>revision|preupload|commit|paths-info|tree|commits|settings)(?:/(?P<rev>[^/]+))?(?:/(?P<path>.+))?)?$"
)
_RESOLVE_ROUTE = re.compile(rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_id(content: bytes) -> str:
    """The git object id of a file, which the Hub reports as `oid` / `ETag` of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    date: str


@dataclass
class HubRepo:
    repo_type: str
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1].oid

    def entries(self, prefix: str = "", recursive: bool = True) -> list[dict]:
        """Tree entries under `prefix` (files and folders), as `list_repo_tree` / `get_paths_info` expect."""
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        found: dict[str, dict] = {}
        for path, content in sorted(self.files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):
                folder = base + "/".join(parts[:depth])
                found.setdefault(folder, {"type": "directory", "path": folder, "oid": self.tree_id(folder)})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                found[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_id(content)}
        return list(found.values())

    def tree_id(self, folder: str) -> str:
        """Content hash of a folder (changes whenever a file under it does), standing in for git's tree id."""
        listing = "".join(f"{p}\0{git_blob_id(c)}\n" for p, c in sorted(self.files.items()) if p.startswith(f"{folder}/"))
        return hashlib.sha1(f"tree\0{listing}".encode()).hexdigest()

    def info(self) -> dict:
        return {
            "id": self.repo_id,
            "author": self.repo_id.split("/")[0],
            "sha": self.sha,
            "private": self.private,
            "lastModified": self.commits[-1].date,
            "siblings": [{"rfilename": path, "size": len(content)} for path, content in sorted(self.files.items())],
        }


class LocalHub:
    """The server: start it (or use it as a context manager), point `HF_ENDPOINT` at `url`, inspect `repos`."""

    def __init__(self, tokens: set[str] | frozenset[str] = frozenset({"hf_local_test_token"}), user: str = "local-user"):
        self.tokens = set(tokens)
        self.user = user
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def repo(self, repo_id: str, repo_type: str = "model") -> HubRepo:
        return self.repos[(repo_type, repo_id)]

    def commit(self, repo: HubRepo, title: str, message: str = "") -> Commit:
        parent = repo.commits[-1].oid if repo.commits else ""
        listing = "".join(f"{path}\0{git_blob_id(content)}\n" for path, content in sorted(repo.files.items()))
        oid = hashlib.sha1(f"{parent}\n{listing}\n{title}\n{message}\n{time.time_ns()}".encode()).hexdigest()
        commit = Commit(oid, title, message, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits.append(commit)
        return commit


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **payload):
        super().__init__(message)
        self.status, self.message, self.code, self.payload = status, message, code, payload


def _make_handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

        def log_message(self, format, *args):  # quiet: tests read failures from the client errors
            pass

        # plumbing -------------------------------------------------------------------------------------------------
        def _reply(self, status: int, body: bytes = b"", headers: dict | None = None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict | None = None):
            self._reply(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _body(self) -> bytes:
            return self.body

        def _authenticated(self) -> bool:
            """True with a known token, False without one; an unknown token is a 401 as on the Hub."""
            header = self.headers.get("Authorization", "")
            if not header:
                return False
            if not header.startswith("Bearer ") or header[len("Bearer "):] not in hub.tokens:
                raise _HubError(401, "Invalid credentials in Authorization header")
            return True

        def _require_token(self):
            if not self._authenticated():
                raise _HubError(401, "Invalid credentials in Authorization header")

        def _repo(self, type_plural: str | None, repo_id: str, revision: str | None = None) -> HubRepo:
            repo_type = (type_plural or "models")[:-1]
            repo = hub.repos.get((repo_type, unquote(repo_id)))
            if repo is None or (repo.private and not self._authenticated()):
                raise _HubError(404 if repo is None else 401, "Repository not found", "RepoNotFound")
            if revision is not None and unquote(revision) not in (BRANCH, repo.sha):
                raise _HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
            return repo

        def _dispatch(self, method: str):
            # Read the whole body first, even for requests refused below: the connection is reused.
            self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                url = urlsplit(self.path)
                with hub.lock:
                    self._route(method, url.path, parse_qs(url.query))
            except _HubError as error:
                headers = {"X-Error-Message": error.message}
                if error.code:
                    headers["X-Error-Code"] = error.code
                self._json(error.status, {"error": error.message, **error.payload}, headers)

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        # routes ---------------------------------------------------------------------------------------------------
        def _route(self, method: str, path: str, query: dict):
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo()
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml()
            if method == "GET" and path == "/api/whoami-v2":
                self._require_token()
                access = {"type": "access_token", "accessToken": {"role": "write"}}
                return self._json(200, {"type": "user", "name": hub.user, "orgs": [], "auth": access})
            if match := _RESOLVE_ROUTE.match(path):
                if method in ("GET", "HEAD"):
                    return self._resolve(match)
            elif match := _API_ROUTE.match(path):
                return self._api(method, match, query)
            raise _HubError(404, f"No route for {method} {path}")

        def _create_repo(self):
            self._require_token()
            payload = json.loads(self._body())
            repo_type = payload.get("type") or "model"
            if repo_type not in REPO_TYPES or not payload.get("name"):
                raise _HubError(400, f"Invalid repo name or type: {payload}")
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.url}/{prefix}{repo_id}"
            if (repo_type, repo_id) in hub.repos:
                raise _HubError(409, f"You already created this {repo_type} repo: {repo_id}", url=url)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = hub.repos[(repo_type, repo_id)] = HubRepo(repo_type, repo_id, private)
            repo.files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            hub.commit(repo, "initial commit")
            self._json(200, {"url": url, "name": repo_id})

        def _validate_yaml(self):
            content = json.loads(self._body()).get("content", "")
            # The Hub parses the metadata block; what it can check without a YAML parser: the block is closed.
            if content.startswith("---") and "\n---" not in content[3:]:
                return self._json(400, {"errors": [{"message": "README.md metadata block is not closed by '---'"}]})
            self._json(200, {"errors": [], "warnings": []})

        def _api(self, method: str, match: re.Match, query: dict):
            action, revision = match["action"], match["rev"]
            if action in ("preupload", "commit") and method == "POST":
                self._require_token()
                repo = self._repo(match["type"], match["repo"], revision)
                if query.get("create_pr"):
                    raise _HubError(400, "This local hub does not support pull requests")
                return self._preupload(repo) if action == "preupload" else self._commit(repo)
            if action == "settings" and method == "PUT":
                self._require_token()
                repo = self._repo(match["type"], match["repo"])
                settings = json.loads(self._body())
                if "visibility" in settings:
                    repo.private = settings["visibility"] == "private"
                elif "private" in settings:
                    repo.private = bool(settings["private"])
                return self._json(200, {})
            if method not in ("GET", "POST"):
                raise _HubError(405, f"{method} not allowed on {self.path}")
            repo = self._repo(match["type"], match["repo"], revision)
            if action in (None, "revision"):
                return self._json(200, repo.info())
            if action == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                entries = repo.entries(unquote(match["path"] or ""), recursive=recursive)
                if match["path"] and not entries:
                    raise _HubError(404, f"{match['path']} does not exist on {BRANCH}", "EntryNotFound")
                return self._json(200, entries)
            if action == "paths-info" and method == "POST":
                wanted = set(parse_qs(self._body().decode()).get("paths", []))
                return self._json(200, [entry for entry in repo.entries() if entry["path"] in wanted])
            if action == "commits":
                return self._json(200, [
                    {"id": c.oid, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": hub.user}]}
                    for c in reversed(repo.commits)
                ])
            raise _HubError(404, f"No route for {method} {self.path}")

        def _preupload(self, repo: HubRepo):
            files = json.loads(self._body())["files"]
            self._json(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_id(repo.files[f["path"]]) if f["path"] in repo.files else None}
                for f in files
            ]})

        def _commit(self, repo: HubRepo):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                raise _HubError(400, "A commit starts with a header line")
            files = dict(repo.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise _HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {path: content for path, content in files.items() if not path.startswith(folder)}
                else:  # lfsFile: preupload never asks for LFS, so a client sending it is out of step
                    raise _HubError(400, f"Unsupported commit operation {key!r} (this hub takes regular uploads only)")
            header = lines[0]["value"]
            repo.files = files
            commit = hub.commit(repo, header.get("summary", ""), header.get("description", ""))
            prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
            commit_url = f"{hub.url}/{prefix}{repo.repo_id}/commit/{commit.oid}"
            self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": commit_url})

        def _resolve(self, match: re.Match):
            repo = self._repo(match["type"], match["repo"], match["rev"])
            path = unquote(match["path"])
            if path not in repo.files:
                raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
            content = repo.files[path]
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_id(content)}"', "Accept-Ranges": "bytes"}
            status, range_header = 200, self.headers.get("Range", "")
            if range_match := re.fullmatch(r"bytes=(\d+)-(\d*)", range_header):
                start = int(range_match[1])
                end = int(range_match[2]) if range_match[2] else len(content) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                content, status = content[start:end + 1], 206
            self._reply(status, content, headers)

    return Handler
