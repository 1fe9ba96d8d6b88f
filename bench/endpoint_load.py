"""The local endpoint under load: latency percentiles, requests/s and status counts at several concurrencies.

    python bench/endpoint_load.py                      # the model of the last job (outputs/last_job.json), ~3 min
    python bench/endpoint_load.py --model-dir outputs/jobs/<job>/model_output --threads 1 --json load.json
    python bench/endpoint_load.py --runtimes transformers   # the tutorial's runtime alone

Serves the model with the endpoint server deploy_model.py starts (stand_ins.endpoint_process.serve_model: a free
loopback port, a key of its own), waits for /ready and sends --warmup-requests untimed. Then:

1. The server's overhead: --overhead-pairs pairs of calls on the same input, one to score.run() in this process
   (scoring_dir/score.py loaded with stand_ins.endpoint_server.load_scoring_script, init() on the same model, called from a
   worker thread as the server's thread pool calls it) and one over HTTP from one client, the order alternating
   so that a drifting machine hits both alike; prints both p50s, their difference and ratio, and the median of
   the paired differences. For answers also HTTP latency minus the time score.run() took inside the server for
   that same request (its Server-Timing header): what the server, the socket and the client add, free of the
   model's own variation. Once more for a request score.py rejects before the model runs (an unknown param:
   400), whose round trip is the server's own path alone.
2. The load: for each concurrency (1, 3, 8, 32) --requests requests, then --long-requests at the highest, with
   the tutorial's request shape but --max-new-tokens 16 and greedy decoding (the model's time is short, so the
   server's share shows). Prints per run: latency p50/p95/p99 of the answered (200) requests, answered/s,
   responses/s, and the counts of 200, 429, other statuses and "lost" requests (no HTTP response at all:
   connection error or client timeout; must be 0 — the exit code is 1 otherwise).

Clients keep one HTTP/1.1 connection each and never retry: a 429 (more than MAX_CONCURRENT_REQUESTS_PER_INSTANCE
requests in flight for longer than MAX_QUEUE_WAIT_MS) is counted, as a load balancer would see it. Every run is
bounded in requests and in time (--run-time-limit-s), the server listens on 127.0.0.1 only and is stopped at the
end whatever happens. --json FILE also writes the results.

--runtimes (default: transformers and onnxruntime-genai, when the model carries the job's ONNX export) serves the
model once per runtime (score.py's SERVING_RUNTIME), both servers up at once; every run above is made for each
runtime in turn before the next run starts, so a drifting machine hits them alike. The last table compares them.
"""

import argparse
import contextlib
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

import config  # noqa: E402 - settings only: the project folder must be on the path first
from helpers.job_record import model_output_dir, read_last_job  # noqa: E402
from helpers.metrics import percentile  # noqa: E402 - numpy's, as evaluate_flow.py reports latency
from stand_ins.endpoint_process import serve_model  # noqa: E402 - the one way to serve a model and stop it

HOST = "127.0.0.1"  # loopback only
# A request score.py rejects before the model runs: its HTTP round trip is the server's own path, and nothing else.
REJECTED_BODY = json.dumps({"input_data": ["Who founded Microsoft?"], "params": {"not_a_param": 1}})


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
    parser.add_argument("--overhead-pairs", type=int, default=400,
                        help="pairs of calls (in-process, HTTP) for the overhead, answered and rejected each")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, help="client timeout; a timed-out request is lost")
    parser.add_argument("--run-time-limit-s", type=float, default=300.0, help="no new request after this long in one run")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the server and torch threads in-process (default: torch's, one per core)")
    parser.add_argument("--runtimes", default="transformers,onnxruntime-genai",
                        help="score.py's runtimes to compare (SERVING_RUNTIME values)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.concurrency = [int(value) for value in args.concurrency.split(",") if value.strip()]
    args.runtimes = [value.strip() for value in args.runtimes.split(",") if value.strip()]
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
    record = read_last_job()
    if not record:
        raise SystemExit(f"error: {config.shown(config.LAST_JOB_FILE)} not found: run `make demo` (or `python setup_ml.py`) "
                         "first, or pass --model-dir")
    return model_output_dir(record)


# --- The load ----------------------------------------------------------------------------------------------------
class Client:
    """One HTTP/1.1 keep-alive connection; reconnects after an error."""

    def __init__(self, port, key, timeout_s):
        self.port, self.timeout_s = port, timeout_s
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.connection = None
        self.last_score_s = None  # score.py's own time for the last answer (the Server-Timing header)

    def post(self, body):
        """POST /score; returns (status or None when no response came, seconds)."""
        started = time.perf_counter()
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout_s)
            self.connection.request("POST", "/score", body=body.encode("utf-8"), headers=self.headers)
            response = self.connection.getresponse()
            response.read()
            timing = response.getheader("Server-Timing", "")
            self.last_score_s = float(timing.partition(";dur=")[2]) / 1000 if ";dur=" in timing else None
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
def load_scorer_in_process(model_dir, max_new_tokens_limit, threads=None, runtime="transformers"):
    """scoring_dir/score.py loaded as the endpoint server loads it, init() on the same model with `runtime`;
    returns (module, seconds)."""
    import torch
    from transformers.utils import logging as transformers_logging

    from stand_ins.endpoint_server import load_scoring_script

    if threads:
        torch.set_num_threads(threads)
    transformers_logging.disable_progress_bar()
    os.environ["MAX_NEW_TOKENS_LIMIT"] = str(max_new_tokens_limit)  # what the endpoint server sets for score.py
    os.environ["SERVING_RUNTIME"] = runtime
    scorer = load_scoring_script()
    started = time.perf_counter()
    scorer.init(str(model_dir))
    return scorer, time.perf_counter() - started


def timed_call(scorer, body):
    """Seconds one in-process score.run() takes; a request it rejects (its BadRequest) is timed too."""
    started = time.perf_counter()
    try:
        scorer.run(body)
    except scorer.BadRequest:
        pass
    return time.perf_counter() - started


def paired_latencies(scorer, client, bodies, pairs, expected_status):
    """`pairs` pairs of calls on the same input: score.run() in-process and over HTTP, the order alternating.

    Returns the in-process and HTTP latencies, their paired differences, HTTP latency minus the server's own
    score.run() time for the same request (from Server-Timing; answers only) and the count of other statuses.
    """
    in_process, over_http, differences, around_score, unexpected = [], [], [], [], 0
    for index in range(pairs):
        body = bodies[index % len(bodies)]
        if index % 2:
            status, http_s = client.post(body)
            local_s = timed_call(scorer, body)
        else:
            local_s = timed_call(scorer, body)
            status, http_s = client.post(body)
        if status != expected_status:
            unexpected += 1
            continue
        in_process.append(local_s)
        over_http.append(http_s)
        differences.append(http_s - local_s)
        if client.last_score_s is not None:
            around_score.append(http_s - client.last_score_s)
    return in_process, over_http, differences, around_score, unexpected


def measure_overhead(scorer, port, key, bodies, pairs, timeout_s):
    """The server's added latency: paired calls, answered requests and requests score.py rejects at once."""
    client = Client(port, key, timeout_s)
    results = {}

    def calls():  # one worker thread, as the server's thread pool calls score.run()
        paired_latencies(scorer, client, bodies, len(bodies), 200)  # warm-up
        results["answered"] = paired_latencies(scorer, client, bodies, pairs, 200)
        results["rejected"] = paired_latencies(scorer, client, [REJECTED_BODY], pairs, 400)

    thread = threading.Thread(target=calls)
    thread.start()
    thread.join()
    client.close()
    summary = {"pairs": pairs}
    for name, (in_process, over_http, differences, around_score, unexpected) in results.items():
        in_p50, http_p50 = percentile(in_process, 50) * 1000, percentile(over_http, 50) * 1000
        summary[name] = {"in_process_p50_ms": in_p50, "in_process_p95_ms": percentile(in_process, 95) * 1000,
                         "http_p50_ms": http_p50, "http_p95_ms": percentile(over_http, 95) * 1000,
                         "overhead_p50_ms": http_p50 - in_p50, "paired_difference_p50_ms": percentile(differences, 50) * 1000,
                         "ratio_http_to_in_process": http_p50 / in_p50, "unexpected_status": unexpected,
                         "http_minus_server_score_p50_ms": _ms(percentile(around_score, 50)),
                         "http_minus_server_score_p95_ms": _ms(percentile(around_score, 95))}
    return summary


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


def print_overhead(overhead):
    """Both overhead measurements: answered requests, and requests the scoring script rejects at once."""
    print(f"\nServer overhead ({overhead['pairs']} pairs of calls on the same input, in-process score.run() and HTTP "
          "from one client, the order alternating, one worker thread):")
    for name, label in (("answered", "answered (200)"), ("rejected", "rejected at once by score.py (400, no model)")):
        figures = overhead[name]
        print(f"  {label}:")
        print(f"    in-process  p50 {figures['in_process_p50_ms']:.2f} ms, p95 {figures['in_process_p95_ms']:.2f} ms")
        print(f"    HTTP        p50 {figures['http_p50_ms']:.2f} ms, p95 {figures['http_p95_ms']:.2f} ms")
        print(f"    -> {figures['overhead_p50_ms']:+.2f} ms at p50 (HTTP / in-process = {figures['ratio_http_to_in_process']:.2f}); "
              f"median of the paired differences {figures['paired_difference_p50_ms']:+.2f} ms"
              + (f"; {figures['unexpected_status']} unexpected status(es)" if figures["unexpected_status"] else ""))
        if figures["http_minus_server_score_p50_ms"] is not None:
            print(f"    HTTP latency minus the server's own score.run() time for the same request (Server-Timing): "
                  f"p50 {figures['http_minus_server_score_p50_ms']:.2f} ms, p95 {figures['http_minus_server_score_p95_ms']:.2f} ms")


def print_comparison(runs_by_runtime):
    """The runtimes side by side: p50 and answered/s per client count, and the ratio to the first runtime."""
    names = list(runs_by_runtime)
    if len(names) < 2:
        return
    first = names[0]
    print(f"\nSide by side (ratio = {first} / runtime; above 1: the runtime is faster):")
    print(f"{'clients':>7} {'requests':>8} " + " ".join(f"{name + ' p50 ms':>28} {'200/s':>7}" for name in names)
          + f" {'p50 ratio':>10} {'200/s ratio':>11}")
    for index, run in enumerate(runs_by_runtime[first]):
        other = runs_by_runtime[names[-1]][index]
        cells = " ".join(f"{_cell(runs_by_runtime[name][index]['p50_ms']):>28} "
                         f"{runs_by_runtime[name][index]['answered_per_s']:>7.1f}" for name in names)
        p50_ratio = run["p50_ms"] / other["p50_ms"] if run["p50_ms"] and other["p50_ms"] else None
        rate_ratio = other["answered_per_s"] / run["answered_per_s"] if run["answered_per_s"] else None
        print(f"{run['concurrency']:>7} {run['sent']:>8} {cells} {_cell(p50_ratio, 'x'):>10} {_cell(rate_ratio, 'x'):>11}")


def _cell(value, unit=""):
    """A number for the table ('-' for none)."""
    return "-" if value is None else f"{value:.1f}{unit}" if not unit else f"{value:.2f}{unit}"


def runtimes_to_measure(requested, model_dir):
    """The requested runtimes the model can be served with (onnxruntime-genai needs the job's export)."""
    has_export = (model_dir / "onnx" / "genai_config.json").is_file()
    runtimes = [name for name in requested if name != "onnxruntime-genai" or has_export]
    for name in set(requested) - set(runtimes):
        print(f"Skipping {name}: {config.shown(model_dir)} has no ONNX export (fine-tune with ONNX_EXPORT=true)")
    if not runtimes:
        raise SystemExit("error: no runtime left to measure")
    return runtimes


def main(argv=None):
    """Start one endpoint per runtime, measure each one's overhead, load them in turn, stop them."""
    args = parse_args(argv)
    model_dir = (args.model_dir or default_model_dir()).resolve()
    runtimes = runtimes_to_measure(args.runtimes, model_dir)
    bodies = request_bodies(sample_questions(), args.max_new_tokens)
    print(f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min) at start; torch threads: "
          f"{args.threads or 'default (one per core)'}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"Model: {config.shown(model_dir)}; {len(bodies)} different questions, max_new_tokens {args.max_new_tokens}, "
          f"greedy; server cap {config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE} concurrent, "
          f"{config.MAX_QUEUE_WAIT_MS} ms queue wait; runtimes: {', '.join(runtimes)}")

    runs, overhead, ready = {name: [] for name in runtimes}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as folder, contextlib.ExitStack() as servers:
        threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
        servers.enter_context(mock.patch.dict(os.environ, threads))
        endpoints = {}
        try:
            for name in runtimes:
                scorer, load_s = load_scorer_in_process(model_dir, config.MAX_NEW_TOKENS_LIMIT, args.threads, name)
                started = time.perf_counter()
                endpoint = servers.enter_context(serve_model(model_dir, Path(folder) / f"{name}.log", host=HOST,
                                                             settings={"SERVING_RUNTIME": name}))
                ready[name] = {"ready_s": time.perf_counter() - started, "in_process_init_s": load_s}
                port, key = int(endpoint.url.rsplit(":", 1)[1].split("/")[0]), endpoint.key
                endpoints[name] = (port, key)
                print(f"{name}: endpoint (pid {endpoint.pid}) ready on {endpoint.url} in {ready[name]['ready_s']:.1f} s "
                      f"(score.init() in this process: {load_s:.1f} s)")
                run_load(port, key, bodies, 1, args.warmup_requests, args.request_timeout_s, args.run_time_limit_s)
                overhead[name] = measure_overhead(scorer, port, key, bodies, args.overhead_pairs, args.request_timeout_s)
            plan = [(level, args.requests) for level in args.concurrency]
            if args.long_requests:
                plan.append((max(args.concurrency), args.long_requests))
            for concurrency, total in plan:
                for name, (port, key) in endpoints.items():  # each run for every runtime before the next run
                    results, wall_s, not_sent = run_load(port, key, bodies, concurrency, total, args.request_timeout_s,
                                                         args.run_time_limit_s)
                    runs[name].append(summarize(results, wall_s, not_sent, concurrency))
                    print(f"  {name}: {concurrency} client(s), {total} requests: {wall_s:.1f} s", flush=True)
        except BaseException:
            for log_path in Path(folder).glob("*.log"):
                print(f"--- {log_path.name} (tail) ---\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-20:]),
                      file=sys.stderr)
            raise
    for name in runtimes:
        print(f"\n=== {name} ===")
        print_runs(runs[name])
        print_overhead(overhead[name])
    print_comparison(runs)
    lost = sum(run["lost"] for name in runtimes for run in runs[name])
    busy_at_or_below_cap = sum(run["busy_429"] for name in runtimes for run in runs[name]
                               if run["concurrency"] <= config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE)
    print(f"Lost requests (no HTTP response): {lost}; 429s at or below the cap of "
          f"{config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE}: {busy_at_or_below_cap}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model_dir": str(model_dir), "threads": args.threads,
                                         "max_new_tokens": args.max_new_tokens, "ready": ready, "runs": runs,
                                         "overhead": overhead, "cores": os.cpu_count()}, indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 1 if lost else 0

if __name__ == "__main__":
    sys.exit(main())
