"""The `kolors-api` command line.

Examples::

    kolors-api serve --model tiny                     # embedded: SQLite + files + one worker
    kolors-api worker --store redis://127.0.0.1:6379/0 --device cuda:0
    kolors-api keys create --name alice --credits 100 --rate-limit 10/min
    kolors-api generate "a red fox in the snow" -o fox.webp --steps 25
    kolors-api tiny-model ./tiny
    kolors-api random-model --size full --device cuda   # the real shapes, random weights
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import logging
import re
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_api import __version__, logs, preflight
from kolors_api.cli_engine import add_engine_options, add_random_model_command, setting_help
from kolors_api.cli_generate import add_arguments as add_generate_arguments
from kolors_api.cli_generate import generate

if TYPE_CHECKING:
    from kolors_api.settings import Settings


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
    from kolors_api.settings import Settings

    values = {k: v for k, v in vars(args).items()
              if v is not None and k in Settings.model_fields} | extra
    return Settings(**values)


def _no_worker(args: argparse.Namespace) -> dict[str, Any]:
    return {"worker": False} if args.no_worker else {}


#: The extra of pyproject.toml that brings a module the command needs (by top-level module name).
EXTRAS = {"redis": "redis", "boto3": "s3", "botocore": "s3", "fastapi": "server", "uvicorn": "server",
          "starlette": "server", "pydantic": "server", "pydantic_settings": "server",
          "prometheus_client": "server", "limits": "server", "rich": "server",
          "diffusers": "worker", "transformers": "worker", "sentencepiece": "worker", "accelerate": "worker",
          "PIL": "worker", "numpy": "worker"}


def where_data_lives(settings: Any, here: str = "serve") -> str:
    """One line for the start-up log: the store, where images go, and whether a worker runs here."""
    worker = f"engine processes on, model {settings.model}" if settings.worker else "no engine process"
    if here == "worker":
        worker = f"model {settings.model}, device {settings.device or 'auto'}"
    blobs = settings.blobs_url()
    if settings.fleet:
        url = re.sub(r"//[^@/]*@", "//***@", settings.store)  # no password in the log
        return f"store {url} (fleet), images {f'in {blobs}' if blobs else 'in Redis'}; {worker}"
    db = settings.sqlite_path().resolve()
    return f"data in {db.parent} (store {db.name}, images {f'in {blobs}' if blobs else 'under outputs/'}); {worker}"


def _check_blobs(settings: Any) -> int | None:
    """Try the blob store of `--blob-url` once (write and delete a probe, short timeouts): None when it
    works or there is none, else exit status 2 after one line (a wrong bucket, credentials, endpoint)."""
    from kolors_api.jobs import make_blobs
    from kolors_api.jobs.blobs import BlobStoreError

    url = settings.blobs_url()
    if url is None:
        return None
    try:
        make_blobs(url).check()
    except BlobStoreError as exc:
        return _refused(exc)
    return None


def _missing_extra(exc: ModuleNotFoundError) -> int | None:
    """A module of an extra that is not installed: one line naming the extra, exit 2 (else None)."""
    top = (exc.name or "").partition(".")[0]
    if top == "torch":
        print("kolors-api: torch is not installed; install it first (pip install torch==2.13.0, or the CUDA "
              "build for your driver), then pip install -e '.[worker]'", file=sys.stderr)
        return 2
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    need = {"redis": "fleet mode (a redis:// store) needs", "s3": "an s3:// blob URL needs"}.get(extra,
                                                                                            "this command needs")
    print(f"kolors-api: {need} the `{extra}` extra, which is not installed (module {top!r} is missing): "
          f"pip install -e '.[{extra}]' in the checkout", file=sys.stderr)
    return 2


def _refused(exc: Exception) -> int:
    """A start-up refusal (a bad `--engine`, a `--model` that cannot be loaded) in one line; exit status 2."""
    print(f"kolors-api: {exc}", file=sys.stderr)
    return 2


def bind_port(host: str, port: int) -> socket.socket:
    """The listening address, bound now (as uvicorn binds it: SO_REUSEADDR, IPv6 for an address with
    a colon) and handed to uvicorn later, so that nobody can take it in between. `OSError` when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def forwarding(settings: Settings) -> dict[str, Any]:
    """uvicorn's proxy options: `X-Forwarded-*` believed only from `KOLORS_API_FORWARDED_ALLOW_IPS`
    (uvicorn alone trusts any loopback client, and its own FORWARDED_ALLOW_IPS variable)."""
    allowed = ",".join(ip.strip() for ip in settings.forwarded_allow_ips.split(",") if ip.strip())
    if not allowed:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": allowed}


def cmd_serve(args: argparse.Namespace) -> int:
    if (refused := preflight.refuse("serve", lambda: _settings(args, **_no_worker(args)))) is not None:
        return refused
    import uvicorn

    from kolors_api.api.app import create_app
    from kolors_api.api.connections import uvicorn_limits
    from kolors_api.worker import EngineFactoryError
    from kolors_api.worker.supervisor import DeviceError

    # --no-worker turns the worker off; without it, KOLORS_API_WORKER decides (default: on).
    settings = _settings(args, **({"worker": False} if args.no_worker else {}))
    # The port first: a second `serve` on a busy port stops here, before it opens the store, attaches
    # a worker to it or loads a model.
    try:
        sock = bind_port(settings.host, settings.port)
    except OSError as exc:
        busy = exc.errno == errno.EADDRINUSE
        what = "is in use" if busy else "cannot be bound"
        hint = "; stop what listens there or pass --port (env KOLORS_API_PORT)" if busy else ""
        print(f"kolors-api: port {settings.port} on {settings.host} {what}: {exc}{hint}", file=sys.stderr)
        return 2
    # before logging is set up: a refusal is one line, without the S3 client's info lines
    if (refused := _check_blobs(settings)) is not None:
        sock.close()
        return refused
    logs.configure(settings.log_level)
    try:
        app = create_app(settings)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, EngineFactoryError | DeviceError):
            return _refused(exc)
        raise
    svc = app.state.service
    grace = settings.shutdown_grace_seconds
    server = make_server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                        timeout_graceful_shutdown=max(1, round(grace)), **forwarding(settings),
                                        **uvicorn_limits(settings)),
                         on_exit=svc.begin_shutdown)
    logging.getLogger("kolors_api").info("kolors-api %s: %s", __version__, where_data_lives(settings))
    # What start-up built lives as long as the server: out of the collector's sight, so that the
    # collections a busy submit path triggers scan only the requests' own short-lived objects.
    gc.collect()
    gc.freeze()
    server.run(sockets=[sock])
    return 0 if server.started else 3


def make_server(config: Any, on_exit: Any) -> Any:
    """uvicorn's server, which also calls `on_exit` when a signal asks it to stop (the engines start
    draining at once, so that the whole shutdown fits in one grace)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            on_exit()
            super().handle_exit(sig, frame)

    return Server(config)


def cmd_worker(args: argparse.Namespace) -> int:
    if (refused := preflight.refuse("worker", lambda: _settings(args))) is not None:
        return refused
    from kolors_api.jobs import make_store
    from kolors_api.worker import EngineFactoryError
    from kolors_api.worker.make import check_worker
    from kolors_api.worker.messages import JobDone
    from kolors_api.worker.metrics import JobMetrics
    from kolors_api.worker.supervisor import DeviceError, Supervisor

    settings = _settings(args)
    # before logging is set up: a refusal is one line, without the S3 client's info lines
    if (refused := _check_blobs(settings)) is not None:
        return refused
    logs.configure(settings.log_level)
    metrics = JobMetrics() if args.metrics_port is not None else None
    store = make_store(settings)

    def done(pid: int, job: JobDone) -> None:
        if metrics is not None:
            metrics.observe(job.seconds, job.outcome, job.stages)
            metrics.report(pid, job.report)

    # A bad engine path, device, terms file or a missing `safety` extra fails here, before an engine loads.
    try:
        check_worker(settings)
        supervisor = Supervisor(settings, store, on_done=done)
    except (EngineFactoryError, DeviceError) as exc:
        return _refused(exc)
    if metrics is not None:
        metrics.watch(supervisor)
        metrics.serve(args.metrics_port)
    logging.getLogger("kolors_api").info("kolors-api %s worker: %s", __version__, where_data_lives(settings, "worker"))

    async def main() -> None:
        await store.open()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.drain)
        try:
            await supervisor.start()
            await supervisor.drained()
            await supervisor.stop(settings.shutdown_grace_seconds)
        finally:
            await store.close()

    asyncio.run(main())
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from kolors_api.api.models import KeyCreate, KeyUpdate, parse_body
    from kolors_api.errors import BadRequest
    from kolors_api.jobs import make_key_record, make_store, new_key
    from kolors_api.jobs.revoke import delete_key, disable_key

    fields: dict[str, Any] = {}
    if args.keys_cmd in ("create", "update"):
        # The very rules of `POST /v1/admin/keys` and `PATCH /v1/admin/keys/{id}`.
        given = {name: getattr(args, name) for name in ("name", "credits", "rate_limit", "max_concurrency", "weight")
                 if getattr(args, name) is not None}
        try:
            if args.keys_cmd == "create":
                fields = parse_body(KeyCreate, {**given, "admin": args.admin}).model_dump()
            else:
                fields = parse_body(KeyUpdate, given).model_dump(exclude_unset=True)
        except BadRequest as exc:
            field, _, problem = exc.message.partition(": ")
            print(f"error: --{field.replace('_', '-')}: {problem}", file=sys.stderr)
            return 2
        if args.keys_cmd == "update" and not fields:
            print("error: keys update: nothing to change (give --name, --credits, --rate-limit, "
                  "--max-concurrency or --weight)", file=sys.stderr)
            return 2
    settings = _settings(args)
    if not settings.fleet and not settings.sqlite_path().exists() and not getattr(args, "init", False):
        # Never a fresh store by accident: its keys would be unknown to the server that runs elsewhere.
        print(f"kolors-api: no store at {settings.sqlite_path().resolve()}; pass the server's --data-dir or "
              f"--store (env KOLORS_API_DATA_DIR / KOLORS_API_STORE), or `keys create --init` to make a new "
              f"one", file=sys.stderr)
        return 2
    store = make_store(settings)

    async def main() -> int:
        await store.open()
        try:
            if args.keys_cmd == "create":
                key = new_key()
                record = make_key_record(fields.pop("name"), key, **fields)
                await store.add_key(record)
                print(key)
                print(f"id={record.id} name={record.name} admin={record.admin} credits={record.credits} "
                      f"weight={record.weight:g}", file=sys.stderr)
            elif args.keys_cmd == "update":
                updated = await store.update_key(args.id, **fields)
                if updated is None:
                    print(f"unknown key: {args.id}", file=sys.stderr)
                    return 1
                print(json.dumps(updated.public()))
            elif args.keys_cmd == "list":
                for k in await store.list_keys():
                    print(json.dumps(k.public()))
            elif args.keys_cmd in ("disable", "enable", "revoke"):
                enabled = args.keys_cmd == "enable"
                # disabled: its queued and running jobs are cancelled and refunded
                changed = await (store.update_key(args.id, enabled=True) if enabled else disable_key(store, args.id))
                if changed is None:
                    print(f"unknown key: {args.id}", file=sys.stderr)
                    return 1
                print(f"{'enabled' if enabled else 'disabled'} {args.id}")
            elif args.keys_cmd == "delete":
                if not await delete_key(store, args.id):
                    print(f"unknown key: {args.id}", file=sys.stderr)
                    return 1
                print(f"deleted {args.id}")
            elif args.keys_cmd == "rotate-webhook-secret":
                if await store.get_key(args.id) is None:
                    print(f"unknown key: {args.id}", file=sys.stderr)
                    return 1
                print(await store.rotate_webhook_secret(args.id))
            return 0
        finally:
            await store.close()

    return asyncio.run(main())


def cmd_generate(args: argparse.Namespace) -> int:
    return generate(args)


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from kolors_api.engine import build_tiny_model
    from kolors_api.engine.tiny_ip_adapter import build_tiny_ip_adapter

    path = build_tiny_model(Path(args.path))
    build_tiny_ip_adapter(path)  # `--ip-adapter tiny` with this model: image encoder and IP-Adapter-Plus weights
    print(path)
    return 0


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                   help=setting_help("data folder: the SQLite store, its images and the tiny model", "data_dir",
                                 "./.kolors-api"))
    p.add_argument("--store", metavar="URL",
                   help=setting_help("sqlite (under --data-dir), sqlite:///PATH, or the fleet's redis://host:port/db "
                                 "(needs the `redis` extra)", "store", "sqlite"))


def _worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=setting_help("tiny, a local diffusers folder, a Hugging Face repo id such as "
                                            "Kwai-Kolors/Kolors-diffusers, or random:small|full (random weights, "
                                            "benchmarks)", "model", "tiny"))
    p.add_argument("--device", help=setting_help("torch device, e.g. cuda:0 or cpu", "device",
                                             "cuda in fp16 if present, else cpu"))
    p.add_argument("--engine", metavar="MODULE:FACTORY",
                   help=setting_help("engine factory (contract in kolors_api.worker.engines)", "engine",
                                 "kolors_api.worker.engines:kolors, the Kolors pipeline"))
    p.add_argument("--blob-url", dest="blob_url", metavar="URL",
                   help=setting_help("where the images go: s3://BUCKET/PREFIX (S3, MinIO, R2; the `s3` extra; "
                                     "credentials, region and endpoint from AWS_* env) or file:///DIR (a folder "
                                     "every worker and API replica shares)", "blob_url",
                                 "files under --data-dir (SQLite), in Redis (fleet)"))
    p.add_argument("--blob-dir", dest="blob_dir", metavar="DIR",
                   help=setting_help("the same as --blob-url file://DIR", "blob_dir", "none"))
    p.add_argument("--log-level", dest="log_level", choices=("debug", "info", "warning", "error"),
                   help=setting_help("our log lines from this level up; debug also shows the dependencies' "
                                     "warnings and INFO lines (transformers, diffusers, botocore)", "log_level",
                                     "info"))
    add_engine_options(p)


def parser() -> argparse.ArgumentParser:
    """The `kolors-api` argument parser (every flag says what it does, its default and its env var)."""
    ap = argparse.ArgumentParser(prog="kolors-api", description="Self-hosted Kolors text-to-image API "
                                 "(Segmind- and OpenAI-compatible). Every setting is also an env var "
                                 "KOLORS_API_*; see docs/settings.md.")
    ap.add_argument("--version", action="version", version=__version__)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the API server (embedded: with its engine processes)",
                       description="Run the API server; embedded by default (SQLite and images under --data-dir, "
                                   "one engine process per --device, started and watched by serve).")
    s.add_argument("--host", help=setting_help("address to listen on (0.0.0.0: every interface)", "host", "127.0.0.1"))
    s.add_argument("--port", type=int, help=setting_help("port to listen on", "port", "8000"))
    s.add_argument("--no-worker", action="store_true",
                   help="API only, no engine process: a fleet replica (default off: a worker runs "
                        "here; env KOLORS_API_WORKER=false does the same)")
    _worker_flags(s)
    _store_flags(s)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run a GPU worker against a shared store",
                       description="Run one worker (one per GPU) against a shared store (fleet: --store redis://…).")
    w.add_argument("--metrics-port", dest="metrics_port", type=int, metavar="PORT",
                   help="serve Prometheus /metrics (kolors_job_duration_seconds) on this port (default off)")
    _worker_flags(w)
    _store_flags(w)
    w.set_defaults(func=cmd_worker)

    k = sub.add_parser("keys", help="manage API keys straight in the store",
                       description="Manage API keys straight in the store, with or without a server running. "
                                   "Pass the server's --data-dir/--store; no store is ever created but by "
                                   "`keys create --init`.")
    ks = k.add_subparsers(dest="keys_cmd", required=True,
                          metavar="{create,update,list,disable,enable,delete,rotate-webhook-secret}")
    kc = ks.add_parser("create", help="create a key (printed once)", description="Create a key; it is printed "
                                      "once on stdout, its id, name, admin flag and credits on stderr.")
    kc.add_argument("--name", required=True, help="a name for the key (required)")
    kc.add_argument("--credits", type=float, default=None, help="credits (default unlimited)")
    kc.add_argument("--rate-limit", dest="rate_limit", default=None, metavar="N/PERIOD",
                    help="requests per s, min or hour, e.g. 10/min (default no limit)")
    kc.add_argument("--max-concurrency", dest="max_concurrency", type=int, default=None, metavar="N",
                    help="queued + running jobs at once (default no cap)")
    kc.add_argument("--weight", type=float, default=None, metavar="W",
                    help="the key's share of the workers while several keys have queued work, a number > 0 "
                         "(weighted fair queuing; default 1)")
    kc.add_argument("--admin", action="store_true", help="an admin key (may manage keys; default a user key)")
    kc.add_argument("--init", action="store_true",
                    help="create the store if there is none yet (default: refuse, naming the path)")
    _store_flags(kc)
    ku = ks.add_parser("update", help="change a key's name, credits, limits or weight",
                       description="Change a key (as PATCH /v1/admin/keys/{id}): only the flags given change; "
                                   "prints the key's record as JSON.")
    ku.add_argument("id", help="the key's id (from `keys list`)")
    ku.add_argument("--name", default=None, help="a new name")
    ku.add_argument("--credits", type=float, default=None, help="set the balance to this many credits")
    ku.add_argument("--rate-limit", dest="rate_limit", default=None, metavar="N/PERIOD",
                    help="requests per s, min or hour, e.g. 10/min")
    ku.add_argument("--max-concurrency", dest="max_concurrency", type=int, default=None, metavar="N",
                    help="queued + running jobs at once")
    ku.add_argument("--weight", type=float, default=None, metavar="W",
                    help="the key's share of the workers while several keys have queued work, a number > 0")
    _store_flags(ku)
    kl = ks.add_parser("list", help="list keys (never the keys themselves)",
                       description="List keys, one JSON object a line (never the keys themselves).")
    _store_flags(kl)
    for name, what in (("disable", "disable a key: it then answers 403 (`keys enable` undoes it)"),
                       ("enable", "enable a disabled key again"),
                       ("delete", "delete a key for good (as DELETE /v1/admin/keys/{id})"),
                       ("rotate-webhook-secret", "print a new whsec_ secret that signs the key's webhooks from now "
                                                 "on (as POST /v1/admin/keys/{id}/webhook-secret)")):
        kd = ks.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        kd.add_argument("id", help="the key's id (from `keys list`)")
        _store_flags(kd)
    # `revoke`, the old name of `disable`: still accepted, no longer listed.
    kr = ks.add_parser("revoke")
    kr.add_argument("id")
    _store_flags(kr)
    k.set_defaults(func=cmd_keys)

    g = sub.add_parser("generate", help="generate an image through a server (KOLORS_API_BASE_URL)",
                       description="Generate images through a running server (v2 submit and poll, with a "
                                   "progress bar).")
    add_generate_arguments(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("tiny-model", help="build the offline random-weight test pipeline",
                       description="Build the offline random-weight test pipeline (the `tiny` model) at PATH.")
    t.add_argument("path", metavar="PATH", help="folder to write the diffusers pipeline to")
    t.set_defaults(func=cmd_tiny_model)
    add_random_model_command(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd is None:
        parser().print_help()
        return 0
    try:
        code: int = args.func(args)
    except ModuleNotFoundError as exc:
        missing = _missing_extra(exc)
        if missing is None:
            raise
        return missing
    except ValueError as exc:
        # pydantic's ValidationError (a ValueError): a flag or KOLORS_API_* setting the settings refuse.
        errors = getattr(exc, "errors", None)
        if type(exc).__name__ != "ValidationError" or errors is None:
            raise
        for error in errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            print(f"kolors-api: {where} (flag --{where.replace('_', '-')}, env KOLORS_API_{where.upper()}): "
                  f"{message}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
