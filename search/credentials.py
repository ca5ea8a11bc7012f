"""Credentials inside a tracking URI (`http://alice:PASSWORD@host:5000`) never travel with it.

At the edge (the command line, before anything records the URI) the user-info of a server's URI moves
into MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, which MLflow reads on every request, and
only the clean URI goes on: into Tune's pickled state, the search's runs, the report, every message.
Every place that shows a URI shows it through `redact_uri`, which also covers a database URI
(`postgresql://USER:PASSWORD@HOST/DB`), whose password the database driver needs in the URI itself.
"""

from __future__ import annotations

import os
import re
import sys
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
# Where the credentials MLflow will use came from, when not from their own variables: set with them
# (and inherited by a process this one execs) so that a refused request can say so.
USERNAME_FROM, PASSWORD_FROM = (
    "FLATBASIN_TRACKING_USERNAME_FROM",
    "FLATBASIN_TRACKING_PASSWORD_FROM",
)
SERVER_SCHEMES = ("http", "https")
# Query parameters of a database URI that hold a secret (libpq, for one, takes ?password=).
SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "token", "secret", "sslpassword"})
_SECRETS: set[str] = set()  # every password seen in a URI, removed from any message (see scrub)


def redact_uri(uri: str) -> str:
    """The URI without its user-info (`user:password@`) and without secret query values."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri if "@" not in uri else "<a tracking URI with user-info, not shown>"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query and any(k.lower() in SECRET_QUERY_KEYS for k, _ in parse_qsl(query, True)):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*"
        )
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def user_info(uri: str) -> tuple[str | None, str | None]:
    """(username, password) of a URI's user-info, percent-decoded; (None, None) without one."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return None, None
    if "@" not in parts.netloc:
        return None, None
    info = parts.netloc.rpartition("@")[0]
    user, sep, password = info.partition(":")
    return unquote(user) or None, unquote(password) if sep else None


def remember(secret: str | None) -> None:
    """A secret that `scrub` removes from messages from now on (in raw and URL-encoded form)."""
    if secret and len(secret) >= 4:  # shorter ones would eat ordinary words, and guard nothing
        _SECRETS.update({secret, quote(secret, safe=""), quote(secret)})


# The user-info of any URI inside a text: `//` then user[:password] then `@` before the host.
_USER_INFO = re.compile(r"(?<=//)[^/\s@]+@(?=[^\s@]*(?:[/\s?#]|$))")


def scrub(text: str) -> str:
    """`text` without any URI's user-info and without any secret seen in a tracking URI (a
    library's error may quote the URI, or part of it)."""
    text = _USER_INFO.sub("", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def adopt(uri: str, source: str) -> str:
    """The URI a command goes on with. A server's user-info moves into the environment (it wins
    over credentials already there: it was given for this command); `source` (`--tracking-uri`,
    `$MLFLOW_TRACKING_URI`) is recorded as where they came from. A database URI keeps its password,
    which its driver reads from there; it is remembered for `scrub`, and shown through redact_uri."""
    user, password = user_info(uri)
    remember(password)
    try:
        for key, value in parse_qsl(urlsplit(uri).query, keep_blank_values=True):
            if key.lower() in SECRET_QUERY_KEYS:
                remember(value)
    except ValueError:
        pass
    if user is None and password is None:
        return uri
    if urlsplit(uri).scheme.lower() not in SERVER_SCHEMES:
        return uri
    where = f"the user-info of {source}"
    for name, marker, given in (
        (USERNAME, USERNAME_FROM, user),
        (PASSWORD, PASSWORD_FROM, password),
    ):
        if given is not None:
            os.environ[name] = given
            os.environ[marker] = where
    clean = redact_uri(uri)
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:  # inherited by every process started later
        os.environ["MLFLOW_TRACKING_URI"] = clean
    return clean


def source_of(variable: str) -> str:
    """Where MLflow's username or password came from: a URI's user-info or the variable itself."""
    marker = USERNAME_FROM if variable == USERNAME else PASSWORD_FROM
    return os.environ.get(marker) or f"${variable}"


def from_uri() -> bool:
    """Whether this command's credentials came from a tracking URI's user-info."""
    return bool(os.environ.get(USERNAME_FROM) or os.environ.get(PASSWORD_FROM))


def tracking_uri_args(args: list[str]) -> list[int]:
    """Indexes in `args` of --tracking-uri's values (`--tracking-uri URI` or `--tracking-uri=URI`)."""
    found = []
    for i, arg in enumerate(args):
        if arg == "--tracking-uri" and i + 1 < len(args):
            found.append(i + 1)
        elif arg.startswith("--tracking-uri="):
            found.append(i)
    return found


def value_at(args: list[str], i: int) -> str:
    return args[i].partition("=")[2] if args[i].startswith("--tracking-uri=") else args[i]


def hide_from_command_line(argv: list[str]) -> None:
    """A server's credentials given in --tracking-uri leave the command line before anything reads it:
    Ray records a driver's command line as its job's entrypoint (shown on a cluster's dashboard), and
    `ps` shows it to every user of the machine. They move into the environment and this process
    execs itself with the clean URI (same pid); `flatbasin submit` refuses them itself (see cli.submit).
    """
    args = argv[1:]
    if not args or args[0] == "submit":
        return
    changed = list(args)
    for i in tracking_uri_args(args):
        uri = value_at(args, i)
        user, password = user_info(uri)
        if (user is None and password is None) or urlsplit(
            uri
        ).scheme.lower() not in SERVER_SCHEMES:
            continue
        clean = adopt(uri, "--tracking-uri")
        changed[i] = f"--tracking-uri={clean}" if args[i].startswith("--tracking-uri=") else clean
    if changed != args:
        sys.stdout.flush()
        sys.stderr.flush()
        # The interpreter's own start as it was (`python -m flatbasin`, or the `flatbasin` script,
        # with any interpreter options), then the arguments without the credentials.
        start = sys.orig_argv[: len(sys.orig_argv) - len(args)]
        if len(start) < 2 or sys.orig_argv[len(start) :] != args:
            start = [sys.executable, "-m", "flatbasin"]
        os.execv(sys.executable, [*start, *changed])
