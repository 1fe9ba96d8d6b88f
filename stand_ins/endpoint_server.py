"""The local endpoint's server: the fine-tuned model on this machine, behaving like an Azure ML managed online endpoint.

    export LOCAL_ENDPOINT_KEY=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    python -m stand_ins.endpoint_server --model-dir outputs/jobs/<job>/model_output --port 5001

deploy_model.py starts it for you (TARGET=local), through stand_ins/endpoint_process.py. It answers with scoring_dir/score.py, the very file the
Azure deployment runs, and speaks the managed endpoint's contract and the serverless endpoints' one:

    POST /score   {"input_data": ["Who founded Microsoft?"], "params": {...}} -> ["answer"]
                  needs the header `Authorization: Bearer $LOCAL_ENDPOINT_KEY`
    POST /v1/chat/completions   {"messages": [...], "max_tokens": 64} -> {"choices": [{"message": ...}]}
                  the serverless endpoints' (OpenAI's) contract, same key, limits and errors, same score.py
                  (stand_ins/chat_completions.py translates); point the `openai` client's base_url at .../v1
    GET  /        "Healthy" (liveness, as Azure's inference server answers); GET /live is the same
    GET  /ready   200 once the model has loaded, 503 while it loads (500 if it failed to load)

Like the managed endpoint it scores at most --max-concurrent requests at a time and turns the rest away
with 429 and Retry-After after a short wait. An answer carries `Server-Timing: score;dur=<ms>`, the time
score.py took, so a client can tell the model's time from the rest. Errors are JSON,
{"error": "<what to change>"}: 400 bad request, 401 missing or wrong key, 404/405 wrong path or method,
413 body too large, 429 busy, 500 the model failed, 503 still loading, 504 scoring took longer than
--request-timeout-ms. (Azure answers every error raised by score.py with 500 and a generic message; here a
bad request gets 400 and its reason.)

The key is read from the environment, never from the command line (where `ps` would show it), and never
logged. One line per request goes to stderr: method, path, status, milliseconds. Ctrl+C or SIGTERM stops it.
"""

import argparse
import asyncio
import contextlib
import hmac
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import config
from scoring_dir.contract import CHAT_COMPLETIONS_PATH, SCORE_ENVIRONMENT, SCORE_PATH
from stand_ins import chat_completions
from stand_ins.endpoint_process import KEY_VARIABLE, RUNTIME_HEADER

SCORING_SCRIPT = config.PROJECT_DIR / "scoring_dir" / "score.py"
RETRY_AFTER_S = 1  # what a 429 tells the client to wait
LOADING_RETRY_AFTER_S = 5  # what a 503 tells the client to wait while the model loads
SHUTDOWN_GRACE_S = 10  # on SIGTERM, in-flight answers get this long to finish, then they are stopped
ROUTES_HELP = f"POST {SCORE_PATH}, POST {CHAT_COMPLETIONS_PATH}, GET / (liveness), GET /live, GET /ready"

logger = logging.getLogger("endpoint_server")


def load_scoring_script(path=SCORING_SCRIPT):
    """Import a scoring script from its file as a module of its own, its folder on sys.path as Azure's server puts it
    (score.py imports contract.py beside it)."""
    if str(Path(path).parent) not in sys.path:
        sys.path.append(str(Path(path).parent))
    spec = importlib.util.spec_from_file_location("score", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(function, *args):
    """(function(*args), seconds it took)."""
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


class RequestLog:
    """ASGI middleware: one line per request (method, path, status, ms); never headers, query or body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            logger.info("%s %s %d %.0f ms", scope["method"], scope["path"], status[0], elapsed_ms)


class Endpoint:
    """The endpoint's state and routes: the scoring script, the key, the concurrency slots."""

    def __init__(self, model_dir, key, max_concurrent, max_queue_wait_s, request_timeout_s, max_body_bytes,
                 scoring_script):
        if not key:
            raise ValueError(f"an empty key would let anyone in; set {KEY_VARIABLE}")
        self.model_dir = str(model_dir)
        self.key = key.encode("utf-8")
        self.max_concurrent = max_concurrent
        self.max_queue_wait_s = max_queue_wait_s
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        self.scorer = load_scoring_script(scoring_script)
        self.slots = None  # an anyio.Semaphore, made in the server's event loop (see lifespan)
        self.ready = False
        self.load_error = None
        self.on_load_error = None  # main() stops the server when the model cannot load

    def load_model(self):
        """Run the scoring script's init(); called in a thread of its own, so health checks answer meanwhile."""
        try:
            self.scorer.init(self.model_dir)
        except Exception as error:  # noqa: BLE001 - any failure is reported on /ready and stops main()
            self.load_error = f"{type(error).__name__}: {error}"
            logger.exception("The model did not load from %s", self.model_dir)
            if self.on_load_error:
                self.on_load_error()
        else:
            self.ready = True
            logger.info("Model loaded; ready to score")

    async def liveness(self, request):
        """GET / and GET /live: the process is up (Azure's inference server answers "Healthy")."""
        return PlainTextResponse("Healthy")

    async def readiness(self, request):
        """GET /ready: 200 once the model has loaded, with score.py's runtime in a header."""
        self.check_ready()
        return PlainTextResponse("Ready", headers={RUNTIME_HEADER: str(getattr(self.scorer, "_runtime", None))})

    def check_ready(self):
        """503 while the model loads, 500 if it failed to load."""
        if self.load_error:
            raise HTTPException(500, f"the model failed to load: {self.load_error}")
        if not self.ready:
            raise HTTPException(503, "the model is still loading", {"Retry-After": str(LOADING_RETRY_AFTER_S)})

    async def score(self, request):
        """POST /score: check the key and body, wait briefly for a slot, answer within the timeout."""
        self.check_key(request)
        self.check_ready()
        body = await self.read_body(request)
        try:  # as Azure's inference server does: run() gets the body as text and parses it (same 400s)
            data = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise HTTPException(400, f"the request body is not UTF-8 text: {error}") from None
        answer, seconds = await self.answer(data)
        # The W3C Server-Timing header: the client sees how much of its wait was the model itself.
        return JSONResponse(answer, headers={"Server-Timing": f"score;dur={seconds * 1000:.2f}"})

    async def chat_completions(self, request):
        """POST /v1/chat/completions: the serverless endpoints' contract, answered by the same score.py."""
        self.check_key(request)
        self.check_ready()
        body = await self.read_body(request)
        try:
            data = chat_completions.as_score_request(body, self.scorer.BadRequest)
        except self.scorer.BadRequest as error:
            raise HTTPException(getattr(error, "status", 400), str(error)) from None
        answer, seconds = await self.answer(data)
        model = json.loads(body).get("model")  # echoed, as OpenAI does; this endpoint serves one model whatever it says
        model = model if isinstance(model, str) and model else Path(self.model_dir).name
        return JSONResponse(chat_completions.completion(answer[0], model),
                            headers={"Server-Timing": f"score;dur={seconds * 1000:.2f}"})

    async def answer(self, data):
        """score.py's answer to `data` (JSON text) and its seconds: a slot within the queue wait, else 429; 504 past
        the timeout; 4xx for a bad request, 500 when scoring fails."""
        if not await self.take_slot():
            raise HTTPException(429, f"busy: {self.max_concurrent} request(s) already being scored and none finished "
                                     f"within {self.max_queue_wait_s * 1000:.0f} ms; retry after {RETRY_AFTER_S} s",
                                {"Retry-After": str(RETRY_AFTER_S)})
        stop = threading.Event()
        work = asyncio.ensure_future(self.score_in_thread(data, stop))
        work.add_done_callback(lambda task: task.cancelled() or task.exception())  # seen, even after a 504
        try:
            done, _ = await asyncio.wait({work}, timeout=self.request_timeout_s)
        finally:
            if not work.done():  # timed out, or the server is shutting down: free the model for the next one
                stop.set()
        if not done:
            raise HTTPException(504, f"scoring took longer than {self.request_timeout_s * 1000:.0f} ms "
                                     "(REQUEST_TIMEOUT_MS); ask for fewer max_new_tokens or fewer inputs")
        try:
            return work.result()
        except self.scorer.BadRequest as error:
            raise HTTPException(getattr(error, "status", 400), str(error)) from None
        except Exception as error:  # noqa: BLE001 - a failed answer is a 500; the server keeps serving
            logger.error("Scoring failed: %s: %s", type(error).__name__, error, exc_info=error)
            raise HTTPException(500, f"scoring failed: {type(error).__name__}: {error}") from None

    def check_key(self, request):
        """401 unless the request carries `Authorization: Bearer <key>` (compared in constant time)."""
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        # Starlette decodes headers as latin-1, so this gives back the bytes the client sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode("latin-1"), self.key):
            raise HTTPException(401, f"missing or wrong key: send the header 'Authorization: Bearer <key>' "
                                     f"with the key the endpoint was started with ({KEY_VARIABLE})",
                                {"WWW-Authenticate": "Bearer"})

    async def read_body(self, request):
        """The body, or 413 as soon as it is known to exceed the limit (declared or while streaming)."""
        too_large = HTTPException(413, f"the request body is larger than {self.max_body_bytes:,} bytes "
                                       "(MAX_REQUEST_BYTES); send fewer or shorter inputs")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_large
        return bytes(body)

    async def take_slot(self):
        """True once a scoring slot is ours; False if none frees up within max_queue_wait_s."""
        try:
            self.slots.acquire_nowait()
            return True
        except anyio.WouldBlock:
            pass
        with anyio.move_on_after(self.max_queue_wait_s):
            await self.slots.acquire()
            return True
        return False

    async def score_in_thread(self, data, stop):
        """Call the scoring script in a worker thread; returns (answer, seconds it took); frees the slot after."""
        try:
            # score.py's run_stoppable() is run() plus an event that stops a timed-out generation (Azure
            # allows run() no second parameter); a scoring script without it is called through run().
            if hasattr(self.scorer, "run_stoppable"):
                return await run_in_threadpool(timed, self.scorer.run_stoppable, data, stop)
            return await run_in_threadpool(timed, self.scorer.run, data)
        finally:
            self.slots.release()


async def error_response(request, error):
    """Every error as JSON: {"error": "<message>"}, with the status and headers of the HTTPException."""
    message = error.detail
    if error.status_code == 404:
        message = f"no such path {request.url.path}; this endpoint serves {ROUTES_HELP}"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; use {error.headers.get('Allow', '')}"
    if request.url.path.startswith(CHAT_COMPLETIONS_PATH):  # OpenAI-compatible clients read error.message
        return JSONResponse(chat_completions.error_body(error.status_code, message), status_code=error.status_code,
                            headers=error.headers)
    return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)


async def unexpected_error(request, error):
    """A bug in this server (not in scoring) still answers JSON."""
    return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500)


def create_app(model_dir, key, max_concurrent=3, max_queue_wait_s=config.MAX_QUEUE_WAIT_MS / 1000,
               request_timeout_s=180.0, max_body_bytes=1_000_000, scoring_script=SCORING_SCRIPT):
    """The ASGI app; the model starts loading when the server starts (see GET /ready)."""
    endpoint = Endpoint(model_dir, key, max_concurrent, max_queue_wait_s, request_timeout_s, max_body_bytes,
                        scoring_script)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        endpoint.slots = anyio.Semaphore(max_concurrent)
        # A daemon thread, so Ctrl+C during a long load need not wait for it to finish.
        threading.Thread(target=endpoint.load_model, name="load-model", daemon=True).start()
        yield

    app = Starlette(
        routes=[
            Route(SCORE_PATH, endpoint.score, methods=["POST"]),
            Route(CHAT_COMPLETIONS_PATH, endpoint.chat_completions, methods=["POST"]),
            Route("/", endpoint.liveness, methods=["GET"]),
            Route("/live", endpoint.liveness, methods=["GET"]),
            Route("/ready", endpoint.readiness, methods=["GET"]),
        ],
        middleware=[Middleware(RequestLog)],
        exception_handlers={HTTPException: error_response, Exception: unexpected_error},
        lifespan=lifespan,
    )
    app.state.endpoint = endpoint
    return app


def parse_args(argv=None):
    """Command-line options; defaults come from config.py (and so from .env)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path,
                        help="the MLflow model fine_tune.py wrote (or a folder holding it), "
                             "e.g. outputs/jobs/<job>/model_output, or a plain transformers folder")
    parser.add_argument("--host", default=config.LOCAL_ENDPOINT_HOST, help="0.0.0.0 exposes it to your network")
    parser.add_argument("--port", type=int, default=config.LOCAL_ENDPOINT_PORT)
    parser.add_argument("--max-concurrent", type=int, default=config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE,
                        help="requests scored at once; more wait up to --max-queue-wait-ms, then get 429")
    parser.add_argument("--max-queue-wait-ms", type=int, default=config.MAX_QUEUE_WAIT_MS,
                        help="how long a request may wait for a free slot before 429")
    parser.add_argument("--request-timeout-ms", type=int, default=config.REQUEST_TIMEOUT_MS,
                        help="a longer answer is stopped and gets 504")
    parser.add_argument("--max-request-bytes", type=int, default=config.MAX_REQUEST_BYTES, help="larger bodies get 413")
    args = parser.parse_args(argv)
    for name in ("max_concurrent", "max_request_bytes", "request_timeout_ms"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue_wait_ms < 0:
        parser.error("--max-queue-wait-ms must be 0 or more")
    return args


def main(argv=None):
    """Check the key and the model folder, then serve until Ctrl+C or SIGTERM."""
    args = parse_args(argv)
    key = os.environ.get(KEY_VARIABLE, "").strip()
    if not key:
        print(f"error: set {KEY_VARIABLE} to the key clients must send (never a command-line argument), e.g.\n"
              f'  export {KEY_VARIABLE}=$(python -c "import secrets; print(secrets.token_urlsafe(32))")',
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # score.py reads its settings from the environment, as in the Azure deployment, which sets them from config.py.
    os.environ.update({name: str(getattr(config, name)) for name in SCORE_ENVIRONMENT})
    app = create_app(args.model_dir, key, args.max_concurrent, args.max_queue_wait_ms / 1000,
                     args.request_timeout_ms / 1000, args.max_request_bytes)
    endpoint = app.state.endpoint
    try:
        endpoint.scorer.find_model_folder(args.model_dir)  # fail now, not after the server has started
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    endpoint.on_load_error = lambda: setattr(server, "should_exit", True)
    logger.info("Serving %s at http://%s:%d/score (at most %d at once, %d ms queue wait, %d ms timeout)", args.model_dir,
                args.host, args.port, args.max_concurrent, args.max_queue_wait_ms, args.request_timeout_ms)
    server.run()
    return 1 if endpoint.load_error or not server.started else 0


if __name__ == "__main__":
    sys.exit(main())
