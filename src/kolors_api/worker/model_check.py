"""`check_model`: refuse a `--model` that cannot be loaded before anything starts, in one line.

Loading a pipeline takes seconds to minutes on the engine's thread; a typo in a path or a hub that
cannot be reached would otherwise end that thread long after the server said it was up. This check
imports no torch and takes at most about `HUB_TIMEOUT` seconds:

- `tiny`: always loadable (built offline on first use); likewise `random:small` and `random:full`
  (built in memory), and any other `random:` name is refused;
- a local folder: it must hold a diffusers pipeline (`model_index.json`);
- anything else that looks like a path: refused (no such folder);
- a Hugging Face repo id: in the local cache, or else answered by the hub (one request, no retries);
  with `HF_HUB_OFFLINE=1` only the cache counts.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from kolors_api.settings import random_model_size
from kolors_api.worker.engines import EngineFactoryError

#: Seconds the one hub request may take.
HUB_TIMEOUT = 5.0
#: What the Hugging Face hub accepts as a repo id (`org/name`).
REPO_ID = re.compile(r"^[\w.-]{1,96}/[\w.-]{1,96}$")
WHAT_TO_DO = ("give a local diffusers folder (--model /path/to/Kolors-diffusers), or download the weights "
              "once where the hub is reachable and run with HF_HUB_OFFLINE=1 from the cache (HF_HOME)")


class ModelNotFound(EngineFactoryError):  # noqa: N818 - named for what the user reads
    """`--model` names no loadable pipeline (raised at start-up, before the engine loads)."""


def check_model(model: str) -> None:
    """Return if `model` can be loaded from here; raise `ModelNotFound` saying what was tried and
    what to do otherwise."""
    if model == "tiny":
        return
    try:
        if random_model_size(model) is not None:
            return
    except ValueError as exc:
        raise ModelNotFound(f"model: {exc}") from None
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelNotFound(f"model: {model} is a folder but not a diffusers pipeline (no model_index.json); "
                                f"give the folder that holds model_index.json")
        return
    if local.exists() or not REPO_ID.match(model) or model.startswith((".", "~")):
        raise ModelNotFound(f"model: no such folder {model}; give `tiny`, a local diffusers folder or a Hugging "
                            f"Face repo id such as Kwai-Kolors/Kolors-diffusers")
    _check_repo(model)


def _check_repo(repo: str) -> None:
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - the `worker` extra brings it (through diffusers)
        raise ModelNotFound(f"model: {repo} is a Hugging Face repo id, but huggingface_hub is not installed "
                            f"(pip install -e '.[worker]')") from None
    cached = huggingface_hub.try_to_load_from_cache(repo, "model_index.json")
    if isinstance(cached, str):
        return
    where = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"model: {repo} is {where} and HF_HUB_OFFLINE is set, so the hub was not asked; "
                            f"{WHAT_TO_DO}")
    import httpx

    url = f"{constants.ENDPOINT.rstrip('/')}/{repo}/resolve/main/model_index.json"
    token = huggingface_hub.get_token()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    quiet = logging.getLogger("httpx")  # the refusal is the one line; no request log before it
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    # httpx's timeout does not bound the name lookup: the request runs on a daemon thread, and the
    # check waits for it at most HUB_TIMEOUT (+1 s) all told.
    outcome: list[httpx.Response | Exception] = []

    def ask() -> None:
        try:
            outcome.append(httpx.head(url, headers=headers, timeout=HUB_TIMEOUT, follow_redirects=False))
        except Exception as exc:  # reported below, as one line
            outcome.append(exc)

    thread = threading.Thread(target=ask, name="kolors-hub-check", daemon=True)
    try:
        thread.start()
        thread.join(HUB_TIMEOUT + 1)
    finally:
        quiet.setLevel(level)
    answer = outcome[0] if outcome else TimeoutError(f"no answer in {HUB_TIMEOUT + 1:g} s")
    if isinstance(answer, Exception):
        raise ModelNotFound(f"model: {repo} is {where} and the hub at {constants.ENDPOINT} cannot be reached "
                            f"({type(answer).__name__}: {answer or 'no answer'}); {WHAT_TO_DO}")
    if answer.status_code in (401, 403, 404):
        raise ModelNotFound(f"model: the hub at {constants.ENDPOINT} has no repo {repo} that this machine may "
                            f"read (HTTP {answer.status_code}); check the name, or log in (HF_TOKEN) for a "
                            f"gated repo")
    if answer.status_code >= 400:
        raise ModelNotFound(f"model: {repo} is {where} and the hub at {constants.ENDPOINT} answered HTTP "
                            f"{answer.status_code}; {WHAT_TO_DO}")
