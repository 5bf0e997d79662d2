"""The Ray Serve application: `POST /predict`, `GET /model`, `GET /healthz`.

A replica holds one `Served` (a Predictor and the version it loaded). Requests are batched
with `@serve.batch`; a batch takes the replica's current Served once, at its start, so every
request in it is answered by that one version, which the answer names. A watcher task in each
replica re-resolves the source every `poll_s` seconds (retrain's champion.json, or what
`--model models/<name>` resolves to); on a change it loads the new version beside the old one
and swaps the reference: nothing restarts, no request is dropped, batches already running
finish on the version they took. A version that fails to load is logged and reported by
/healthz, and the old one keeps serving.

`build` is the import path of jobs/k8s/rayservice.yaml; `run` is `brainmri serve`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..config import ServeConfig
from ..core.cluster import init_ray
from ..evaluation.inference import open_model
from ..evaluation.sources import default_limits
from . import served as S

log = logging.getLogger("ray.serve")
APP = "brainmri"
DEPLOYMENT = "brainmri"
ROUTES = {"/predict": "POST", "/model": "GET", "/healthz": "GET"}


def _json(status: int, body: dict, **headers) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers or None)


# max_ongoing_requests: enough queued requests per replica to fill batches of max_batch_size
@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=64, health_check_period_s=10)
class BrainMRI:
    def __init__(self):
        self.cfg: ServeConfig | None = None
        self.served: S.Served | None = None
        self.last_error = ""
        self.limit = S.body_limit(default_limits())
        self._swap = asyncio.Lock()  # one load at a time (watcher or reconfigure)
        self._watcher: asyncio.Task | None = None

    async def reconfigure(self, args: dict) -> None:
        """Serve's user_config: at start and on every config update (in place, no restart)."""
        cfg = S.replica_config(args)
        self.predict_batch.set_max_batch_size(cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
        self.cfg = cfg
        await self.refresh(force=True)  # a failure here fails the replica's start, with the reason
        if cfg.poll_s > 0 and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def refresh(self, force: bool = False) -> bool:
        """Load what the source names now if it is not what is served; True if swapped."""
        cfg = self.cfg
        async with self._swap:
            weights, champion = await asyncio.to_thread(S.resolve, cfg)  # storage I/O off the loop
            if not force and self.served and weights == self.served.weights_uri:
                return False
            new = await asyncio.to_thread(S.load, weights, champion, cfg)
            old, self.served = self.served, new  # the swap: one reference, atomic for the loop
        log.info("serving %s/%s (was %s)", new.identity["name"], new.identity["version"],
                 old.identity["version"] if old else "nothing")
        return True

    async def _watch(self) -> None:
        """Follow promotions until poll_s is set to 0; never dies of a bad champion."""
        while self.cfg.poll_s > 0:
            await asyncio.sleep(self.cfg.poll_s)
            try:
                await self.refresh()
                self.last_error = ""
            except Exception as e:  # noqa: BLE001 - keep serving the loaded version, say why
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                log.warning("keeping %s: %s", self.served.identity["version"], self.last_error)
        self._watcher = None

    def check_health(self) -> None:
        if self.served is None:
            raise RuntimeError("no model loaded")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, items: list[tuple[str, bytes]]) -> list[tuple[S.Served, object]]:
        served = self.served  # taken once: the whole batch is answered by this version
        rows = await asyncio.to_thread(served.predictor.predict, items)
        return [(served, row) for row in rows]

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        method = ROUTES.get(path)
        if method is None:
            return _json(404, {"ok": False, "error": "not_found",
                               "detail": "routes: POST /predict, GET /model, GET /healthz"})
        if request.method != method:
            return _json(405, {"ok": False, "error": "method_not_allowed",
                               "detail": f"{path} takes {method}"}, allow=method)
        if path == "/predict":
            return await self._predict(request)
        if path == "/model":
            return _json(200, {**self.served.card(), "last_error": self.last_error})
        return _json(200, {"status": "ok", "model": self.served.identity,
                           "last_error": self.last_error})

    async def _predict(self, request: Request) -> JSONResponse:
        try:
            body = await S.read_body(request.stream(), request.headers.get("content-length"),
                                     self.limit)
            item = S.image_from_body(request.headers.get("content-type", ""), body)
        except S.BadRequest as e:
            return _json(e.status, e.fields())
        served, row = await self.predict_batch(item)
        status, payload = S.answer(row, served)
        return _json(status, payload)


def build(args: dict):
    """Serve application builder (serveConfigV2 `import_path: brainmri.serving.app:build`,
    `args`: the replica settings). Replicas and CPUs come from the config's `deployments`."""
    return BrainMRI.options(user_config=S.replica_args(S.replica_config(args))).bind()


def application(cfg: ServeConfig):
    return BrainMRI.options(num_replicas=cfg.replicas, ray_actor_options={"num_cpus": cfg.cpus_per_replica},
                            user_config=S.replica_args(cfg)).bind()


def run(cfg: ServeConfig) -> int:
    """`brainmri serve`: deploy, print where, and serve until interrupted (or return at once
    with `detach`). The source is resolved and the model opened here first, so a missing
    champion or a tampered model is one line, before Ray starts."""
    weights, _ = S.resolve(cfg)
    ref = open_model(weights)
    init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application(cfg), name=APP, route_prefix="/")
    source = f"following {S.champion_file(cfg).uri}" if cfg.store else cfg.model
    print(f"serving {ref.name}/{ref.version} at http://{cfg.host}:{cfg.port}/predict "
          f"({cfg.replicas} replica(s); {source})", flush=True)
    if cfg.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP)
    return 0
