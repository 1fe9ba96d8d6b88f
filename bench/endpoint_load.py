"""The local endpoint under load: latency percentiles, requests/s and status counts at several concurrencies.

    python bench/endpoint_load.py                      # the model of the last job (outputs/last_job.json), ~1 min
    python bench/endpoint_load.py --model-dir outputs/jobs/<job>/model_output --threads 1 --json load.json

Starts local_endpoint.py (the server deploy_model.py starts) as a subprocess on a free loopback port with a key of
its own, waits for /ready and sends --warmup-requests untimed. Then:

1. The server's overhead: alternating rounds of score.run() in this process (scoring_dir/score.py loaded with
   local_endpoint.load_scoring_script, init() on the same model, called from a worker thread as the server's
   thread pool calls it) and of the same requests over HTTP from one client; prints both p50s, the difference
   in ms and the ratio.
2. The load: for each concurrency (1, 3, 8, 32) --requests requests, then --long-requests at the highest, with
   the tutorial's request shape but --max-new-tokens 16 and greedy decoding (the model's time is short, so the
   server's share shows). Prints per run: latency p50/p95/p99 of the answered (200) requests, answered/s,
   responses/s, and the counts of 200, 429, other statuses and "lost" requests (no HTTP response at all:
   connection error or client timeout; must be 0 — the exit code is 1 otherwise).

Clients keep one HTTP/1.1 connection each and never retry: a 429 (more than MAX_CONCURRENT_REQUESTS_PER_INSTANCE
requests in flight for longer than MAX_QUEUE_WAIT_MS) is counted, as a load balancer would see it. Every run is
bounded in requests and in time (--run-time-limit-s), the server listens on 127.0.0.1 only and is stopped at the
end whatever happens. --json FILE also writes the results.
"""

import argparse
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

import config  # noqa: E402 - settings only: the project folder must be on the path first

HOST = "127.0.0.1"  # loopback only
READY_TIMEOUT_S = 120
STOP_GRACE_S = 15


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the MLflow model to serve (default: model_output of the job in LAST_JOB_FILE)")
    parser.add_argument("--concurrency", default="1,3,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency")
    parser.add_argument("--long-requests", type=int, default=1000, help="one more run at the highest concurrency (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--warmup-requests", type=int, default=10, help="untimed requests before the first run")
    parser.add_argument("--overhead-rounds", type=int, default=4, help="alternating rounds of in-process and HTTP calls")
    parser.add_argument("--overhead-calls", type=int, default=50, help="calls per round, each way")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, help="client timeout; a timed-out request is lost")
    parser.add_argument("--run-time-limit-s", type=float, default=300.0, help="no new request after this long in one run")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the server and torch threads in-process (default: torch's, one per core)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.concurrency = [int(value) for value in args.concurrency.split(",") if value.strip()]
    return args


# --- What is sent ---------------------------------------------------------------------------------------------
def sample_questions(count=8):
    """The first user question of the first `count` bundled chats (what the tiny model was trained on)."""
    questions = []
    for line in Path(config.SAMPLE_DATASET_PATH).read_text(encoding="utf-8").splitlines()[:count]:
        questions.append(json.loads(line)["messages"][0]["content"])
    return questions


def request_bodies(questions, max_new_tokens):
    """The tutorial's request (one question, its params) with few new tokens and greedy decoding, as JSON text."""
    params = {"temperature": 0.7, "max_new_tokens": max_new_tokens, "do_sample": False, "return_full_text": True}
    return [json.dumps({"input_data": [question], "params": params}) for question in questions]


def default_model_dir():
    """model_output of the job setup_ml.py recorded last."""
    record_path = Path(config.LAST_JOB_FILE)
    if not record_path.is_file():
        raise SystemExit(f"error: {config.shown(record_path)} not found: run `make demo` (or `python setup_ml.py`) "
                         "first, or pass --model-dir")
    path = Path(json.loads(record_path.read_text())["model_output"])
    return path if path.is_absolute() else PROJECT_DIR / path


# --- The server -------------------------------------------------------------------------------------------------
def free_port():
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(model_dir, port, key, log_path, threads=None):
    """local_endpoint.py in a subprocess, as deploy_model.py starts it; returns the Popen."""
    command = [sys.executable, str(PROJECT_DIR / "local_endpoint.py"), "--model-dir", str(model_dir),
               "--host", HOST, "--port", str(port)]
    env = {**os.environ, "LOCAL_ENDPOINT_KEY": key, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=PROJECT_DIR, start_new_session=True)


def wait_until_ready(process, port, timeout_s=READY_TIMEOUT_S):
    """Poll GET /ready until 200; returns the seconds it took. Fails if the process exits."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"local_endpoint.py exited with code {process.returncode} before it was ready")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=2)
            connection.request("GET", "/ready")
            status = connection.getresponse().status
            connection.close()
            if status == 200:
                return time.perf_counter() - started
            if status == 500:
                raise RuntimeError("local_endpoint.py could not load the model")
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"local_endpoint.py was not ready after {timeout_s} s")


def stop_server(process):
    """SIGTERM, then SIGKILL after STOP_GRACE_S; only the process this script started."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- The load ----------------------------------------------------------------------------------------------------
class Client:
    """One HTTP/1.1 keep-alive connection; reconnects after an error."""

    def __init__(self, port, key, timeout_s):
        self.port, self.timeout_s = port, timeout_s
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.connection = None

    def post(self, body):
        """POST /score; returns (status or None when no response came, seconds)."""
        started = time.perf_counter()
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout_s)
            self.connection.request("POST", "/score", body=body.encode("utf-8"), headers=self.headers)
            response = self.connection.getresponse()
            response.read()
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return response.status, time.perf_counter() - started
        except (OSError, http.client.HTTPException):
            self.close()
            return None, time.perf_counter() - started

    def close(self):
        """Drop the connection."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def run_load(port, key, bodies, concurrency, total, timeout_s, time_limit_s):
    """`total` requests from `concurrency` clients; returns (list of (status, seconds), wall seconds, not sent)."""
    results, lock, counter = [], threading.Lock(), iter(range(total))
    started = time.perf_counter()

    def worker():
        client = Client(port, key, timeout_s)
        try:
            while time.perf_counter() - started < time_limit_s:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                outcome = client.post(bodies[index % len(bodies)])
                with lock:
                    results.append(outcome)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(time_limit_s + timeout_s + 10)
    return list(results), time.perf_counter() - started, total - len(results)


def percentile(values, q):
    """The q-th percentile (0-100) of `values`, nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(results, wall_s, not_sent, concurrency):
    """Latency percentiles of the 200s (ms), rates and status counts of one run."""
    ok = [seconds for status, seconds in results if status == 200]
    statuses = [status for status, _ in results]
    return {"concurrency": concurrency, "sent": len(results), "not_sent": not_sent, "wall_s": wall_s,
            "ok": statuses.count(200), "busy_429": statuses.count(429), "lost": statuses.count(None),
            "other": sum(1 for s in statuses if s not in (200, 429, None)),
            "other_statuses": sorted({s for s in statuses if s not in (200, 429, None)}),
            "p50_ms": _ms(percentile(ok, 50)), "p95_ms": _ms(percentile(ok, 95)), "p99_ms": _ms(percentile(ok, 99)),
            "answered_per_s": len(ok) / wall_s if wall_s else None,
            "responses_per_s": (len(results) - statuses.count(None)) / wall_s if wall_s else None}


def _ms(seconds):
    """Seconds as milliseconds (None stays None)."""
    return None if seconds is None else seconds * 1000


# --- Overhead: the scoring script without the server ----------------------------------------------------------------
def load_scorer_in_process(model_dir, max_new_tokens_limit, threads=None):
    """scoring_dir/score.py loaded as local_endpoint.py loads it, init() on the same model; returns (module, seconds)."""
    import torch
    from transformers.utils import logging as transformers_logging

    from local_endpoint import load_scoring_script

    if threads:
        torch.set_num_threads(threads)
    transformers_logging.disable_progress_bar()
    os.environ["MAX_NEW_TOKENS_LIMIT"] = str(max_new_tokens_limit)  # what local_endpoint.py sets for score.py
    scorer = load_scoring_script()
    started = time.perf_counter()
    scorer.init(str(model_dir))
    return scorer, time.perf_counter() - started


def in_process_latencies(scorer, bodies, count):
    """`count` score.run() calls on the bodies, from a worker thread as the server's thread pool calls it."""
    latencies = []

    def calls():
        for index in range(count):
            started = time.perf_counter()
            scorer.run(bodies[index % len(bodies)])
            latencies.append(time.perf_counter() - started)

    thread = threading.Thread(target=calls)
    thread.start()
    thread.join()
    return latencies


def measure_overhead(scorer, port, key, bodies, rounds, per_round, timeout_s):
    """Alternate rounds of in-process score.run() and HTTP at 1 client (so drifting load hits both alike)."""
    in_process, over_http, lost = [], [], 0
    in_process_latencies(scorer, bodies, len(bodies))  # warm-up
    for _ in range(rounds):
        in_process += in_process_latencies(scorer, bodies, per_round)
        results, _, _ = run_load(port, key, bodies, 1, per_round, timeout_s, 3600)
        over_http += [seconds for status, seconds in results if status == 200]
        lost += sum(1 for status, _ in results if status != 200)
    in_p50, http_p50 = percentile(in_process, 50) * 1000, percentile(over_http, 50) * 1000
    return {"rounds": rounds, "calls_each": len(in_process), "in_process_p50_ms": in_p50,
            "in_process_p95_ms": percentile(in_process, 95) * 1000, "http_p50_ms": http_p50,
            "http_p95_ms": percentile(over_http, 95) * 1000, "overhead_p50_ms": http_p50 - in_p50,
            "ratio_http_to_in_process": http_p50 / in_p50, "http_not_200": lost}


# --- Output ----------------------------------------------------------------------------------------------------------
def print_runs(runs):
    """One line per run."""
    print(f"\n{'clients':>7} {'sent':>5} {'200':>5} {'429':>5} {'other':>5} {'lost':>5} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'200/s':>7} {'resp/s':>7} {'wall s':>7}")
    for run in runs:
        cells = [f"{run[key]:>8.1f}" if run[key] is not None else f"{'-':>8}" for key in ("p50_ms", "p95_ms", "p99_ms")]
        print(f"{run['concurrency']:>7} {run['sent']:>5} {run['ok']:>5} {run['busy_429']:>5} {run['other']:>5} "
              f"{run['lost']:>5} {' '.join(cells)} {run['answered_per_s']:>7.1f} {run['responses_per_s']:>7.1f} "
              f"{run['wall_s']:>7.1f}" + (f"  ({run['not_sent']} not sent: time limit)" if run["not_sent"] else ""))


def main(argv=None):
    """Start the endpoint, measure its overhead, load it, stop it."""
    args = parse_args(argv)
    model_dir = (args.model_dir or default_model_dir()).resolve()
    bodies = request_bodies(sample_questions(), args.max_new_tokens)
    print(f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min) at start; torch threads: "
          f"{args.threads or 'default (one per core)'}")
    print(f"Model: {config.shown(model_dir)}; {len(bodies)} different questions, max_new_tokens {args.max_new_tokens}, "
          f"greedy; server cap {config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE} concurrent, "
          f"{config.MAX_QUEUE_WAIT_MS} ms queue wait")
    scorer, load_s = load_scorer_in_process(model_dir, config.MAX_NEW_TOKENS_LIMIT, args.threads)

    key, port = secrets.token_urlsafe(32), free_port()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as folder:
        log_path = Path(folder) / "endpoint.log"
        process = start_server(model_dir, port, key, log_path, args.threads)
        try:
            ready_s = wait_until_ready(process, port)
            print(f"local_endpoint.py (pid {process.pid}) ready on http://{HOST}:{port}/score in {ready_s:.1f} s "
                  f"(score.init() in this process: {load_s:.1f} s)")
            run_load(port, key, bodies, 1, args.warmup_requests, args.request_timeout_s, args.run_time_limit_s)
            overhead = measure_overhead(scorer, port, key, bodies, args.overhead_rounds, args.overhead_calls,
                                        args.request_timeout_s)
            plan = [(level, args.requests) for level in args.concurrency]
            if args.long_requests:
                plan.append((max(args.concurrency), args.long_requests))
            for concurrency, total in plan:
                results, wall_s, not_sent = run_load(port, key, bodies, concurrency, total, args.request_timeout_s,
                                                     args.run_time_limit_s)
                runs.append(summarize(results, wall_s, not_sent, concurrency))
                print(f"  {concurrency} client(s), {total} requests: {wall_s:.1f} s", flush=True)
        except BaseException:
            print("--- endpoint log (tail) ---\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-20:]),
                  file=sys.stderr)
            raise
        finally:
            stop_server(process)
    print_runs(runs)
    print(f"\nServer overhead ({overhead['rounds']} alternating rounds, {overhead['calls_each']} calls each way, "
          f"worker thread in both):")
    print(f"  score.run() in-process  p50 {overhead['in_process_p50_ms']:.1f} ms, p95 {overhead['in_process_p95_ms']:.1f} ms")
    print(f"  HTTP, 1 client          p50 {overhead['http_p50_ms']:.1f} ms, p95 {overhead['http_p95_ms']:.1f} ms")
    print(f"  -> {overhead['overhead_p50_ms']:+.1f} ms per request at p50 (HTTP / in-process = "
          f"{overhead['ratio_http_to_in_process']:.2f})")
    lost = sum(run["lost"] for run in runs)
    busy_at_or_below_cap = sum(run["busy_429"] for run in runs if run["concurrency"] <= config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE)
    print(f"Lost requests (no HTTP response): {lost}; 429s at or below the cap of "
          f"{config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE}: {busy_at_or_below_cap}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model_dir": str(model_dir), "threads": args.threads,
                                         "max_new_tokens": args.max_new_tokens, "ready_s": ready_s,
                                         "in_process_init_s": load_s, "runs": runs, "overhead": overhead,
                                         "cores": os.cpu_count()}, indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
