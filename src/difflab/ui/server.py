"""Who may reach the lab's server and what it answers: bind, login, Host names, served files.

:func:`check_bind` refuses a non-loopback ``--host`` without a decision about a login;
:func:`read_auth` takes the login from ``--auth``, ``--auth-file`` or ``DIFFLAB_UI_AUTH``
(so that it need not show in the process list); :func:`check_runs_dir` refuses to serve the
file-system root, the home folder (or a folder above it) and a folder holding ``.git`` or
``.ssh``. :class:`Guard` wraps the web app: a request whose ``Host`` is not a name the server
was started for is refused (400), so a web page cannot reach a loopback lab through DNS
rebinding; a file of the runs folder that :func:`difflab.ui.paths.may_serve` refuses
(training state, locks, hidden files) is answered 403; and every response says
``X-Content-Type-Options: nosniff``, so a browser never guesses an upload into a page.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path

from difflab.errors import UsageError
from difflab.ui.paths import may_serve

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")  # listen on every interface
AUTH_ENV = "DIFFLAB_UI_AUTH"
UNSAFE_OPTION = "--allow-unsafe-runs-dir"
_FILE_ROUTE = re.compile(r"/file=(.+)$")


def _pair(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise UsageError(f"{where}: expected USER:PASSWORD")
    return user, password


def read_auth(auth: str | None = None, auth_file: str | Path | None = None) -> tuple[str, str] | None:  # fmt: skip
    """The (user, password) of ``--auth``, else of ``--auth-file``, else of ``DIFFLAB_UI_AUTH``."""
    if auth is not None:
        return _pair(auth, f"--auth {auth!r}")
    if auth_file is not None:
        path = Path(auth_file).expanduser()
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except FileNotFoundError:
            raise UsageError(f"--auth-file {auth_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "not UTF-8 text"
            raise UsageError(f"--auth-file {auth_file}: cannot read it ({why})") from None
        if len(lines) != 1:
            raise UsageError(f"--auth-file {auth_file}: expected one line USER:PASSWORD")
        return _pair(lines[0], f"--auth-file {auth_file}")
    env = os.environ.get(AUTH_ENV)
    return _pair(env, AUTH_ENV) if env else None


def check_bind(host: str, pair: tuple[str, str] | None, no_auth: bool) -> str | None:
    """Refuse a public bind without a login (or an explicit ``--no-auth``); the warning to
    print about a public one (once every other check has passed), else None."""
    if host in LOOPBACK:
        return None
    if pair is None and not no_auth:
        raise UsageError(
            f"--host {host}: other machines could reach the lab; give --auth USER:PASSWORD, "
            f"--auth-file FILE or {AUTH_ENV} (or --no-auth to allow anyone who can reach this port)"
        )
    return (
        f"warning: listening on {host}: the lab (and the runs folder) is reachable from "
        f"the network{'' if pair else ' without a password'}"
    )


def check_runs_dir(runs: Path, text: str, allow_unsafe: bool = False) -> None:
    """Refuse to serve a folder that holds far more than runs (unless ``allow_unsafe``)."""
    runs = runs.resolve()
    home = Path.home().resolve()
    reason = None
    if runs.parent == runs:
        reason = "is the root of the file system"
    elif runs == home or runs in home.parents:
        reason = "holds your home folder"
    elif any(part in (".git", ".ssh") for part in runs.parts):
        reason = "lies inside a .git or .ssh folder"
    else:
        for folder in [runs, *(p for p in _children(runs) if p.is_dir())]:
            found = next((n for n in (".git", ".ssh") if (folder / n).exists()), None)
            if found:
                reason = f"holds {(folder / found).relative_to(runs)}"
                break
    if reason and not allow_unsafe:
        raise UsageError(
            f"--runs-dir {text}: {reason}, and the UI serves every file in the runs folder; "
            f"choose a folder of runs (e.g. ./runs), or pass {UNSAFE_OPTION}"
        )


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The ``Host`` names the server answers: loopback, ``host`` itself and ``--allowed-host``."""
    names = {*LOOPBACK, host, *extra}
    if host in WILDCARD:  # every interface: this machine's names too
        names |= {socket.gethostname(), socket.getfqdn()}
    return frozenset(n.strip().lower().strip("[]").rstrip(".") for n in names if n.strip())


def host_name(header: str) -> str:
    """``example.org:7860`` -> ``example.org``; ``[::1]:7860`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        header = header.split(":")[0]
    return header.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware of the lab's server: the Host check, the served-file rule, nosniff."""

    def __init__(self, app, hosts: frozenset[str], any_ip: bool, runs: Path) -> None:
        self.app, self.hosts, self.any_ip, self.runs = app, hosts, any_ip, Path(runs).resolve()

    def host_ok(self, header: str | None) -> bool:
        if not header:
            return False
        name = host_name(header)
        # a browser sends an IP literal only when the page was opened by that address, so an
        # address cannot be rebound; a wildcard bind answers every address of the machine
        return name in self.hosts or (self.any_ip and _is_ip(name))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.host_ok(host):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _refuse(send, 400, f"Host {host!r} is not a name this lab was started for (difflab ui --allowed-host NAME)")  # fmt: skip
        if scope["type"] == "http":
            m = _FILE_ROUTE.search(scope.get("path", ""))
            if m and not may_serve(Path(os.path.abspath(m[1])), self.runs):
                return await _refuse(send, 403, "This file of the runs folder is not served.")

        async def send_nosniff(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *(message.get("headers") or []), (b"x-content-type-options", b"nosniff")
                ]  # fmt: skip
            await send(message)

        return await self.app(scope, receive, send_nosniff)


async def _refuse(send, status: int, text: str) -> None:
    body = text.encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-content-type-options", b"nosniff")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})
