"""`localmoe flower`: Flower, as LocalMoE runs it (`localmoe up`, compose, systemd).

- Behind basic auth always (its UI and its REST API alike): the user and password are the
  settings' (`flower_user`, `flower_password`; generated on first start and kept in
  <home>/secrets.json when unset), or FLOWER_BASIC_AUTH; with neither, it does not start.
- Persistent: its task history is kept in <home>/flower/state, written every
  flower.state_save_interval_s and when it stops, read back when it starts; at most
  flower.max_tasks tasks (the oldest go first).
- It never asks workers to switch Celery's task events on: the jobs' events come from the
  workers' relays (scheduler/task_events.py); Celery's per-message ones would only add noise.
- Its Celery app is LocalMoE's (queues, priority steps, JSON) on kombu's own Redis transport,
  whose redis:// URLs its queue view knows; a worker that came online after Flower last asked
  is asked for its queues within INSPECT_S, so the queue view lists every worker's queue.

Other FLOWER_* environment variables (Flower's own settings, e.g. FLOWER_URL_PREFIX behind a
proxy) apply on top.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from celery import Celery

from host.settings import Settings
from scheduler.queue import make_celery

log = logging.getLogger(__name__)

INSPECT_S = 5.0  # how often Flower looks for workers it has not asked for their queues yet


def state_file(settings: Settings) -> Path:
    """Flower's state (shelve; dbm may add a suffix or two)."""
    return settings.home / "flower" / "state"


def celery_app(broker_url: str) -> Celery:
    app = make_celery(broker_url)
    # kombu's own Redis transport: Flower reads events and asks workers through it, and its queue
    # view recognises only the standard schemes (make_celery's transport reports its own).
    app.conf.broker_transport = None
    return app


def password(settings: Settings) -> str:
    if settings.flower_password is not None:
        return settings.flower_password.get_secret_value()
    from localmoe.up import load_secrets

    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return load_secrets(settings.home)["flower_password"]


def configure(settings: Settings) -> Any:
    """Flower's options (tornado's global `options`): LocalMoE's, then FLOWER_* on top."""
    from flower.command import apply_env_options
    from flower.options import options

    db = state_file(settings)
    db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    options.address = settings.flower_host
    options.port = settings.flower_port
    if "FLOWER_BASIC_AUTH" not in os.environ:  # else applied below
        options.basic_auth = [f"{settings.flower_user}:{password(settings)}"]
    options.persistent = True
    options.db = str(db)
    options.max_tasks = settings.flower.max_tasks
    options.state_save_interval = int(settings.flower.state_save_interval_s * 1000)
    options.enable_events = False
    apply_env_options()
    if not (options.basic_auth or options.auth):
        raise SystemExit("Flower needs authentication: set flower_password or FLOWER_BASIC_AUTH")
    return options


def serve(settings: Settings) -> None:
    """Run Flower until SIGTERM or SIGINT; its state file is written as it stops."""
    from flower.app import Flower
    from flower.command import extract_settings, setup_logging
    from flower.urls import settings as web_settings
    from tornado.ioloop import PeriodicCallback

    class LocalMoEFlower(Flower):
        def start(self) -> None:
            PeriodicCallback(self._ask_new_workers, INSPECT_S * 1000).start()
            super().start()

        def _ask_new_workers(self) -> None:
            known = self.inspector.workers
            if any(w.alive and name not in known for name, w in self.events.state.workers.items()):
                self.update_workers()

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.nice(settings.flower.niceness)
    options = configure(settings)
    extract_settings()
    setup_logging()
    flower = LocalMoEFlower(capp=celery_app(settings.require_redis_url()), options=options, **web_settings)

    def on_signal(signum: int, _frame: object) -> NoReturn:
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    port = flower.start_http_server()
    log.info(
        "Flower on http://%s:%s (state %s, at most %d tasks)",
        options.address,
        port,
        options.db,
        options.max_tasks,
    )
    try:
        flower.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        flower.stop()
