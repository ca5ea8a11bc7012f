"""The user's own code, named `module:callable` (as entry points and uvicorn name things): found in the
user's folder first (the space file's, or the current one for `train`), then on the normal path.

A module that cannot be found or raises while importing ends in one UserCodeError naming the file
and line of the user's own error; its source files are hashed, so a trial records which code ran.

A callable handed to `flatbasin.search(model=...)` or `flatbasin.train(data=...)` from Python that
cannot be imported by name (defined in a notebook, a script or a module the workers cannot import)
is named `callable:NAME` in the trial's config; its pickled copy travels beside the config and is
registered here under that name (`install`), where `load_callable` finds it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import inspect
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict

_OURS = str(
    Path(__file__).resolve().parents[1]
)  # this package's folder: frames there are not the user's
_LIBRARIES = ("site-packages", "dist-packages", f"{sys.prefix}/lib", f"{sys.base_prefix}/lib")
# `package.module:attribute.path`: Python identifiers joined by dots on either side of one colon.
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
REF = re.compile(rf"({_DOTTED}):({_DOTTED})")
PASSED = (
    "callable"  # `callable:NAME`: a Python callable handed in from Python, not importable by name
)
_passed: dict[str, Callable[..., Any]] = {}  # `callable:NAME` -> the callable, in this process


class UserCodeError(ValueError):
    """The user's module or callable cannot be used; the message names it and, where there is one,
    the file and line of the user's own error."""


@dataclass(frozen=True)
class Ref:
    module: str
    attr: str

    def __str__(self) -> str:
        return f"{self.module}:{self.attr}"


def parse_ref(text: str) -> Ref | None:
    """`module:callable` as a Ref; None for anything else (a built-in name)."""
    match = REF.fullmatch(text.strip())
    return Ref(match[1], match[2]) if match else None


def on_path(folder: str | Path | None) -> None:
    """Put the user's folder first on this process's import path (idempotent)."""
    if folder is None:
        return
    text = str(Path(folder))
    if Path(text).is_dir() and text not in sys.path:
        sys.path.insert(0, text)


def find_in(folder: Path, top: str) -> Path | None:
    spec = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
    return Path(spec.origin) if spec is not None and spec.origin else None


def import_module(name: str, folder: str | Path | None, what: str) -> ModuleType:
    """`name`, from `folder` first (then the normal path). `what` starts every message."""
    top = name.split(".")[0]
    here = Path(folder) if folder is not None and Path(folder).is_dir() else None
    found = find_in(here, top) if here is not None else None
    if found is not None:
        on_path(here)
        loaded = sys.modules.get(top)
        origin = getattr(loaded, "__file__", None)
        if loaded is not None and origin is not None and Path(origin).resolve() != found.resolve():
            raise UserCodeError(
                f"{what}: module '{top}' is already imported from {origin}, so {found} cannot be; "
                "rename your file so that its name is not taken"
            )
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            looked = f"{here} or " if here is not None else ""
            raise UserCodeError(
                f"{what}: no module named '{name}' in {looked}the installed packages; put {name.replace('.', '/')}.py "
                "beside the space file (or in the current folder for train and lr-find)"
            ) from None
        raise UserCodeError(f"{what}: importing '{name}' failed: {describe_error(err)}") from None
    except Exception as err:  # the user's module raised while it was imported: say where
        raise UserCodeError(f"{what}: importing '{name}' failed: {describe_error(err)}") from None


class PassedCode(BaseModel):
    """What a trial records of a callable handed in from Python: its pickled copy's SHA-256 (the
    identity of what ran, closures included; it keys the per-process data cache) and its source,
    when Python has it (a notebook cell's, a script's), so that a reader sees what ran."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str
    source: str | None = None


def register(name: str, fn: Callable[..., Any]) -> None:
    """Make `name` (`callable:NAME`) find `fn` in this process."""
    _passed[name] = fn


def install(blobs: dict[str, bytes]) -> None:
    """Unpickle callables the driver pickled by value and register each under its name (a worker,
    before its trial's config is read). A callable that cannot be unpickled here (a module it
    refers to by name is missing on this node) is a UserCodeError naming it."""
    import cloudpickle

    for name, blob in blobs.items():
        try:
            fn = cloudpickle.loads(blob)
        except Exception as err:
            raise UserCodeError(
                f"{name}: the callable handed to flatbasin cannot be unpickled on this node: "
                f"{describe_error(err)}; a module it uses must be installed here too"
            ) from None
        register(name, fn)


def load_callable(ref: Ref, folder: str | Path | None, what: str) -> Callable[..., Any]:
    if str(ref) in _passed:
        return _passed[str(ref)]
    if ref.module == PASSED and find_in(Path(folder or "."), PASSED) is None:
        raise UserCodeError(
            f"{what}: a Python callable handed to flatbasin.search or flatbasin.train, which this "
            "process was not given (it cannot be imported by name); pass it again as model= or data="
        )
    module = import_module(ref.module, folder, what)
    target: Any = module
    for part in ref.attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            names = sorted(
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
            )
            raise UserCodeError(
                f"{what}: module '{ref.module}' ({getattr(module, '__file__', '?')}) has no "
                f"'{ref.attr}'; its callables: {', '.join(names[:12]) or '(none)'}"
            ) from None
    if not callable(target):
        raise UserCodeError(f"{what}: '{ref}' is {a_type(target)}, not a callable")
    return target


def call_user(fn: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> Any:
    """Call the user's function; its own error becomes one UserCodeError naming its file and line."""
    try:
        return fn(*args, **kwargs)
    except MemoryError:
        raise
    except Exception as err:
        raise UserCodeError(f"{what} raised {describe_error(err)}") from None


def check_kwargs(fn: Callable[..., Any], given: dict[str, Any], fixed: int, what: str) -> None:
    """`given` keyword arguments must be in `fn`'s signature (after `fixed` positional ones), unless
    it takes **kwargs."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: let the call say
    params = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = {
        p.name
        for p in params[fixed:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(given) - named)
    if unknown:
        raise UserCodeError(
            f"{what}: unknown argument(s) {', '.join(unknown)} for {_name(fn)}{signature}; "
            f"it takes: {', '.join(sorted(named)) or '(none)'}"
        )


def a_type(value: object) -> str:
    """'an int', 'a Tensor': the article and the type of `value`."""
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def describe_error(err: BaseException) -> str:
    """'ValueError: message (at FILE:LINE)', the line being the innermost frame outside Python's
    import machinery and this package: where the user's code raised."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if "importlib" not in f.filename and not f.filename.startswith(("<frozen", _OURS))
    ]
    if isinstance(err, SyntaxError) and err.filename:
        return f"{text} (at {err.filename}:{err.lineno})"
    # The user's own frames first: an error raised inside torch is still the user's call's fault.
    own = [f for f in frames if not any(lib in f.filename for lib in _LIBRARIES)]
    if own:
        return f"{text} (at {own[-1].filename}:{own[-1].lineno})"
    return (
        text  # raised inside a library (torch's layers): its file and line say nothing to the user
    )


def source_files(module_name: str) -> list[Path]:
    """The files of an imported module: its .py file, or every .py file of its package."""
    module = sys.modules.get(module_name.split(".")[0])
    origin = getattr(module, "__file__", None)
    if origin is None:
        return []
    path = Path(origin)
    if path.name == "__init__.py":
        return sorted(p for p in path.parent.rglob("*.py") if "__pycache__" not in p.parts)
    return [path]


def code_digest(files: list[Path]) -> str:
    """SHA-256 over the files' names and bytes (empty string for no files)."""
    if not files:
        return ""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


MAX_RECORDED_BYTES = 1 << 20  # a trial records its user modules up to this size in all


def _files_now(module: str, folder: str | Path | None) -> tuple[Path, list[Path]]:
    """(the folder that holds it, its files): what `module` would be imported from now, without
    importing it, from `folder` first."""
    top = module.split(".")[0]
    here = Path(folder) if folder is not None and Path(folder).is_dir() else None
    origin = find_in(here, top) if here is not None else None
    if origin is None:
        spec = importlib.machinery.PathFinder.find_spec(top)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or not origin.is_file():
        return Path(), []
    if origin.name == "__init__.py":
        package = origin.parent
        return package.parent, sorted(
            p for p in package.rglob("*.py") if "__pycache__" not in p.parts
        )
    return origin.parent, [origin]


def code_files(modules: list[str], folder: str | Path | None) -> dict[str, Path]:
    """{name to record: file} for the user's modules as they would be imported now; names are
    relative to the folder that holds each module (`model.py`, `mypkg/layers.py`)."""
    found: dict[str, Path] = {}
    for module in modules:
        root, files = _files_now(module, folder)
        found |= {str(path.relative_to(root)): path for path in files}
    return found


def recorded_code(modules: list[str], folder: str | Path | None) -> dict[str, str]:
    """The user's module files as text, to record with a trial (empty past MAX_RECORDED_BYTES)."""
    files = code_files(modules, folder)
    if sum(p.stat().st_size for p in files.values()) > MAX_RECORDED_BYTES:
        return {}
    return {
        name: path.read_text(encoding="utf-8", errors="replace") for name, path in files.items()
    }


def text_digest(code: dict[str, str]) -> str:
    """SHA-256 over recorded files' names and texts: what ran, compared with what is here now."""
    if not code:
        return ""
    digest = hashlib.sha256()
    for name in sorted(code):
        digest.update(name.encode() + b"\0" + code[name].encode() + b"\0")
    return digest.hexdigest()
