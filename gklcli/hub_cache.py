"""Hub models as gkl reads them: ``hf://OWNER/NAME[@REVISION][/PATH]`` specs, the Hugging Face cache, and the
config.json that `gkl export-hub` writes beside the weights.

A spec names the repository's ``model.safetensors`` (or the file PATH) at REVISION (default main).
``huggingface_hub.snapshot_download`` resolves it into the Hugging Face cache together with the ``config.json``
beside it (one snapshot: one revision for both), so it works offline (``HF_HUB_OFFLINE=1``) once cached. The
Hub's failures (no such repository, revision or file, offline without a cached copy, HTTP errors, no connection)
become one line. `loading.load_model_file` and the distillation teachers read specs through here; `gklcli.hub`
writes and publishes the folders.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from gklcli.checkpoint import read_json
from gklcli.errors import GKLError, show

HUB_SCHEME = "hf://"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CONFIG_FORMAT = "gkl-hub-model"

_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?"  # the Hub's rule: no leading/trailing '-' or '.'
REPO_ID = re.compile(rf"{_PART}/{_PART}")
REPO_ID_RULE = "OWNER/NAME: letters, digits, '-', '_' or '.', no '--' or '..', at most 96 characters"
_SPEC = re.compile(r"hf://(?:models/)?(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>refs/pr/\d+|[A-Za-z0-9_.\-]+))?"
                   r"(?:/(?P<path>[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*))?")
_HTTP_STACKS = {"httpx", "httpx2", "requests", "urllib3", "huggingface_hub"}


# --------------------------------------------------------------------------- names and specs


def check_repo_id(value: str, what: str = "--repo-id") -> str:
    """`value` if it is a repository id the Hub accepts (checked whole); else one line naming the rule."""
    if not REPO_ID.fullmatch(value) or len(value) > 96 or "--" in value or ".." in value:
        raise GKLError(f"{what} {show(value)}: must be a Hugging Face Hub repository id, {REPO_ID_RULE}")
    return value


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf://OWNER/NAME[@REVISION][/PATH]``."""

    repo_id: str
    revision: Optional[str]
    filename: str

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        path = "" if self.filename == WEIGHTS else f"/{self.filename}"
        return f"{HUB_SCHEME}{self.repo_id}{at}{path}"


def is_hub_spec(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(HUB_SCHEME)


def parse_hub_spec(text: str) -> HubSpec:
    """The repository, revision and file of an hf:// spec, each checked; one line for a malformed one."""
    match = _SPEC.fullmatch(text)
    if match is None or ".." in (match.group("path") or "").split("/"):
        raise GKLError(f"{show(text)}: not a Hub model; use hf://OWNER/NAME, hf://OWNER/NAME@REVISION or "
                       "hf://OWNER/NAME[@REVISION]/PATH/IN/REPO.safetensors")
    check_repo_id(match.group("repo"), f"{text}: repository")
    return HubSpec(match.group("repo"), match.group("revision"), match.group("path") or WEIGHTS)


def _from_http_stack(error: BaseException) -> bool:
    """An exception of the HTTP libraries huggingface_hub uses (a refused connection, a timeout)."""
    return any(cls.__module__.split(".")[0] in _HTTP_STACKS for cls in type(error).__mro__)


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """huggingface_hub's failures (no such repository, revision or file, offline without a cached copy, an HTTP error,
    no connection) as one line naming `what`; any other exception is a bug and keeps its traceback."""
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except RepositoryNotFoundError as error:
        raise GKLError(f"{what}: no such repository on the Hub, or it is private or gated (set HF_TOKEN)") from error
    except RevisionNotFoundError as error:
        raise GKLError(f"{what}: no such revision in the repository") from error
    except LocalEntryNotFoundError as error:
        raise GKLError(f"{what}: not in the Hugging Face cache, and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no "
                       "network); download it once online") from error
    except HfHubHTTPError as error:
        raise GKLError(f"{what}: the Hub refused ({_first_line(error)})") from error
    except Exception as error:  # only the HTTP stack's own errors (and OSError) become one line
        if isinstance(error, OSError) or _from_http_stack(error):
            raise GKLError(f"{what}: the Hub cannot be reached or the call failed ({type(error).__name__}: "
                           f"{_first_line(error)})") from error
        raise


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def download_weights(text: str) -> Path:
    """The local file an hf:// spec names, from the Hugging Face cache (downloaded on first use), with the
    repository's config.json beside it when there is one (one revision for both: one snapshot)."""
    from huggingface_hub import snapshot_download

    spec = parse_hub_spec(text)
    config = posixpath.join(posixpath.dirname(spec.filename), CONFIG)
    with hub_errors(str(spec)):
        folder = snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=[spec.filename, config])
    weights = Path(folder) / spec.filename
    if not weights.is_file():
        raise GKLError(f"{spec}: the repository has no {spec.filename} at revision {spec.revision or 'main'} "
                       "(or the cached snapshot lacks it and the Hub cannot be reached)")
    return weights


# --------------------------------------------------------------------------- config.json


MAX_IMAGE_SIZE = 4096  # config.json's image_size sizes verify_folder's probe batch: bounded, not a TB allocation
_OPTIONAL_STR = (str, type(None))
_CONFIG_KINDS: dict[str, Any] = {"arch": str, "num_classes": int, "image_size": int, "dataset": _OPTIONAL_STR,
                                 "recipe": (dict, type(None)), "kind": _OPTIONAL_STR, "eps": _OPTIONAL_STR,
                                 "threat_model": _OPTIONAL_STR, "recipe_hash": _OPTIONAL_STR}
# what gkl reads of a recipe (the card, eval-aa's synthetic/digits test sets, analyze): (dotted key, type, required)
_RECIPE_KEYS: tuple[tuple[str, Any, bool], ...] = (
    ("data", dict, True), ("data.dataset", str, True), ("loss", dict, True), ("loss.name", str, True),
    ("attack", dict, True), ("attack.eps", (int, float), True), ("data.num_workers", int, False),
    ("data.synthetic", (dict, type(None)), False), ("data.digits", (dict, type(None)), False),
    ("data.digits.image_size", (int, type(None)), False),
    *((f"data.synthetic.{k}", int, False) for k in ("num_test", "num_classes", "image_size", "seed")),
)


_DESCRIBE = {int: "an integer", str: "a string", dict: "a mapping", _OPTIONAL_STR: "a string or null",
             (dict, type(None)): "a mapping or null", (int, float): "a number", (int, type(None)): "an integer or null"}


def _check_value(path: Path, key: str, value: Any, kind: Any, positive: bool = False) -> None:
    """One key of config.json: its type (never a bool for a number); image sizes bounded, `positive` ones ≥ 1."""
    sized = key.endswith("image_size") and isinstance(value, int)
    bad = not isinstance(value, kind) or isinstance(value, bool) or (positive and value < 1)
    if bad or (sized and not 1 <= value <= MAX_IMAGE_SIZE):
        what = f"an integer from 1 to {MAX_IMAGE_SIZE}" if sized else "a positive integer" if positive else _DESCRIBE[kind]
        raise GKLError(f"{path}: {key} is {show(value)}; a gkl config.json records it as {what}")


def _check_recipe(path: Path, recipe: dict[str, Any]) -> None:
    """The recipe sections gkl reads, so a hand-made config.json fails here rather than deep in export-hub or eval-aa."""
    for dotted, kind, required in _RECIPE_KEYS:
        parent: Any = recipe
        *head, last = dotted.split(".")
        for part in head:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or (last not in parent and not required):
            continue  # an optional key, or one under an absent optional section
        _check_value(path, f"recipe.{dotted}", parent.get(last), kind)


def read_model_config(path: Path) -> Optional[dict[str, Any]]:
    """gkl's config.json beside a safetensors file, checked key by key (and the recipe's sections gkl reads); None
    when there is none or it is another library's (timm's, transformers')."""
    if not path.is_file():
        return None
    config = read_json(path, "config.json")
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        return None
    for key, kind in _CONFIG_KINDS.items():
        _check_value(path, key, config.get(key), kind, positive=kind is int)
    if config["recipe"] is not None:
        _check_recipe(path, config["recipe"])
    return config
