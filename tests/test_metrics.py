"""Metrics end to end: a real server scraped by a real Prometheus, promtool on the exposition and the rules,
the gauges under load, the JSON request log, and docs/metrics.md and the dashboard held to the exposition.

One small server (tiny fixture model, 32 MiB KV cache, 4 sequences at a time, JSON logs) serves the whole
module; every test reads its counters before and after, so the tests do not depend on their order.
Prometheus and promtool are the Debian `prometheus` package (tools/install-system-deps.sh): missing, the
tests that need them skip on a developer machine and fail when the environment variable CI is set.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from harness import ROOT, TINY_MODEL, ServerProcess, collect, generate_request, image_bytes
from visionchat.v1 import visionchat_pb2 as pb

PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "rules.yml"
RULES_TEST = PROM_DIR / "rules_test.yml"
DASHBOARD = PROM_DIR / "dashboard.json"
DOC = ROOT / "docs" / "metrics.md"
MAX_NUM_SEQS = 4
SERVER_ARGS = [
    "--model", str(TINY_MODEL),
    "--kv-cache-memory", "32MiB",
    "--max-num-seqs", str(MAX_NUM_SEQS),
    "--log-format", "json",
]
FAMILY = re.compile(r"^(visionchat|grpc_server)_\w+$")


def tool(name: str) -> str:
    """Path of a Prometheus binary; skip without it on a developer machine, fail in CI."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing and CI is set: tools/install-system-deps.sh installs it")
    pytest.skip(f"{name} is not installed (Debian package prometheus; set CI=1 to make this a failure)")


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` and the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


# --- the exposition --------------------------------------------------------------------------------


def parse_exposition(text: str) -> tuple[dict[str, dict[str, str]], dict[str, set[str]]]:
    """Families {name: {"type", "help"}} from # HELP/# TYPE, and the label names seen on each sample name."""
    families: dict[str, dict[str, str]] = {}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            families.setdefault(name, {})["help"] = help_text.replace("\\n", "\n").replace("\\\\", "\\")
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE "):].partition(" ")
            families.setdefault(name, {})["type"] = kind
        elif line and not line.startswith("#"):
            head = line.rsplit(" ", 1)[0]
            name, _, rest = head.partition("{")
            labels.setdefault(name, set()).update(re.findall(r'(\w+)="', rest))
    return families, labels


def documented_families(families: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The visionchat_* and grpc_server_* families, less prometheus_client's `_created` companions
    (a gauge with the creation time of each counter and histogram series, same help text)."""
    out = {}
    for name, fam in families.items():
        if not FAMILY.match(name):
            continue
        base = name.removesuffix("_created")
        if name != base and (base + "_total" in families or families.get(base, {}).get("type") == "histogram"):
            continue
        out[name] = fam
    return out


def sample_labels(family: str, kind: str, labels: dict[str, set[str]]) -> set[str] | None:
    """Label names on the samples of one family (`le` of histogram buckets left out); None without samples."""
    names = [family + s for s in ("_bucket", "_sum", "_count")] if kind == "histogram" else [family]
    seen = [labels[n] for n in names if n in labels]
    return set().union(*seen) - {"le"} if seen else None


# --- the module's server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vc() -> Iterator[ServerProcess]:
    proc = ServerProcess(SERVER_ARGS).start()
    try:
        # One request that finishes and one that fails, so that every family has samples before any test
        # (and the series Prometheus will see exist before it starts).
        with grpc.insecure_channel(proc.address) as ch:
            collect(proc.stub(ch).Generate(generate_request("Warm up.", max_new_tokens=2, ignore_eos=True), timeout=60))
            with pytest.raises(grpc.RpcError) as err:
                collect(proc.stub(ch).Generate(generate_request("x", max_new_tokens=100_000), timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        proc.wait_idle()
        yield proc
    finally:
        proc.stop()


# --- a real Prometheus -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """/usr/bin/prometheus on 127.0.0.1, scraping one target every second, with rules.yml loaded."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.target = target
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = workdir / "prometheus.log"

    def start(self, timeout: float = 60.0) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "visionchat", "static_configs": [{"targets": [self.target]}]}],
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        for _attempt in range(3):  # the free port may be taken between choosing and binding it
            self.port = free_port()
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config_file}",
                        f"--storage.tsdb.path={self.workdir / 'data'}",
                        "--storage.tsdb.retention.time=1h",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=warn",
                    ],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self._ready():
                    return self
                time.sleep(0.2)
            self.stop()
        raise RuntimeError("prometheus did not start:\n" + self.log.read_text(errors="replace")[-4000:])

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            body = json.load(exc)
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query; None when it returns nothing."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} returned {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)


@pytest.fixture
def prometheus(vc: ServerProcess, tmp_path: Path) -> Iterator[Prometheus]:
    prom = Prometheus(tool("prometheus"), tmp_path, f"127.0.0.1:{vc.metrics_port}").start()
    try:
        yield prom
    finally:
        prom.stop()


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, Grafana's variables replaced by match-all values."""
    dashboard = json.loads(DASHBOARD.read_text())
    subs = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$job": ".*", "$instance": ".*", "$worker": ".*"}
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in subs.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def test_prometheus_scrapes_request_and_token_counts(vc: ServerProcess, prometheus: Prometheus) -> None:
    base = {
        "success": vc.metric("visionchat_request_success_total"),
        "length": vc.metric("visionchat_request_success_total", finished_reason="length"),
        "generation": vc.metric("visionchat_generation_tokens_total"),
        "prompt": vc.metric("visionchat_prompt_tokens_total"),
        "image": vc.metric("visionchat_image_tokens_total"),
        "ttft": vc.metric("visionchat_time_to_first_token_seconds_count"),
    }
    # Prometheus has scraped the server at least once (the state before the requests is in its TSDB).
    wait_for("the first scrape", lambda: prometheus.value('up{job="visionchat"}') == 1, 30)
    wait_for("the baseline scraped", lambda: prometheus.value("sum(visionchat_request_success_total)") == base["success"], 30)

    finished: list[pb.ChatFinished] = []
    with grpc.insecure_channel(vc.address) as ch:
        stub = vc.stub(ch)
        requests = [generate_request(f"Count to {k}.", max_new_tokens=5, ignore_eos=True) for k in range(3)]
        requests.append(
            generate_request("What is in the picture?", [image_bytes("A_640x480")], num_crops=1, max_new_tokens=5, ignore_eos=True)
        )
        for req in requests:
            finished.append(collect(stub.Generate(req, timeout=60))[2])
    assert [f.usage.completion_tokens for f in finished] == [5, 5, 5, 5]
    assert finished[3].usage.image_tokens > 0 and all(f.usage.image_tokens == 0 for f in finished[:3])

    expected = {
        "sum(visionchat_request_success_total)": base["success"] + 4,
        'sum(visionchat_request_success_total{finished_reason="length"})': base["length"] + 4,
        "sum(visionchat_generation_tokens_total)": base["generation"] + 3 * 5 + 5,
        "sum(visionchat_prompt_tokens_total)": base["prompt"] + sum(f.usage.prompt_tokens for f in finished),
        "sum(visionchat_image_tokens_total)": base["image"] + finished[3].usage.image_tokens,
        "sum(visionchat_time_to_first_token_seconds_count)": base["ttft"] + 4,
    }

    def scraped() -> dict[str, float | None]:
        return {expr: prometheus.value(expr) for expr in expected}

    got = wait_for("the requests in Prometheus", lambda: (lambda g: g if g == expected else None)(scraped()), 30, 0.5)
    assert got == expected
    assert prometheus.value('sum(visionchat_time_to_first_token_seconds_bucket{le="+Inf"})') == base["ttft"] + 4

    # The recording rules, evaluated by this Prometheus over the real exposition's labels.
    def recorded() -> dict[str, float | None]:
        return {
            name: prometheus.value(name)
            for name in (
                "job:visionchat_generation_tokens:rate5m",
                "job:visionchat_request_success:rate5m",
                "job:visionchat_time_to_first_token_seconds:p99_rate5m",
                "job:visionchat_request_errors:ratio_rate5m",
                "instance:visionchat_workers_expected:count",
            )
        }

    def recorded_ready() -> dict[str, float | None] | None:
        r = recorded()
        ok = (
            (r["job:visionchat_generation_tokens:rate5m"] or 0) > 0
            and (r["job:visionchat_request_success:rate5m"] or 0) > 0
            and r["job:visionchat_time_to_first_token_seconds:p99_rate5m"] is not None
            and math.isfinite(r["job:visionchat_time_to_first_token_seconds:p99_rate5m"])
            and r["job:visionchat_request_errors:ratio_rate5m"] is not None
        )
        return r if ok else None

    rec = wait_for("the recording rules", recorded_ready, 30, 0.5)
    assert 0 < rec["job:visionchat_time_to_first_token_seconds:p99_rate5m"] <= 80  # type: ignore[operator]
    assert rec["job:visionchat_request_errors:ratio_rate5m"] == 0  # the warm-up's INVALID_ARGUMENT is the caller's
    assert rec["instance:visionchat_workers_expected:count"] == 1
    assert prometheus.value("sum(visionchat_request_failures_total)") == vc.metric("visionchat_request_failures_total") >= 1

    groups = prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert prometheus.query('ALERTS{alertstate="firing"}') == []

    # Every dashboard query parses and runs against this data; the core panels have data.
    empty = []
    for title, expr in dashboard_exprs():
        if not prometheus.query(expr):
            empty.append(title)
    for title in ("Time to first token", "Inter-token latency", "End-to-end request latency", "Tokens / s",
                  "Requests running / waiting", "KV cache usage", "RPCs / s by method and code"):
        assert title not in empty, f"dashboard panel {title!r} has no data"


# --- promtool ---------------------------------------------------------------------------------------


def test_promtool_check_metrics_is_clean(vc: ServerProcess) -> None:
    text = vc.metrics_text()
    assert "visionchat_time_to_first_token_seconds_bucket" in text and "grpc_server_handled_total" in text
    out = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def test_promtool_rules_check_and_unit_tests() -> None:
    promtool = tool("promtool")
    groups = yaml.safe_load(RULES.read_text())["groups"]
    n_rules = sum(len(g["rules"]) for g in groups)
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {n_rules} rules found" in check.stdout
    assert "WARNING" not in check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=PROM_DIR, capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_rule_tests_cover_every_alert_firing_and_not_firing() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert alerts >= {
        "VisionChatHighErrorRate", "VisionChatTimeToFirstTokenHigh", "VisionChatQueueGrowing",
        "VisionChatKVCacheNearlyFull", "VisionChatWorkerRestarted", "VisionChatWorkersDown",
    }
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown not firing"
    for rule in (r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r):
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])


# --- gauges under load ------------------------------------------------------------------------------


def gauges(vc: ServerProcess) -> dict[str, float]:
    text = vc.metrics_text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        if name in {
            "visionchat_num_requests_running", "visionchat_num_requests_waiting", "visionchat_num_requests_waiting_frontend",
            "visionchat_kv_cache_usage_perc", "visionchat_kv_cache_free_blocks", "visionchat_kv_cache_total_blocks",
        }:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def is_idle(g: dict[str, float]) -> bool:
    return (
        g["visionchat_num_requests_running"] == 0
        and g["visionchat_num_requests_waiting"] == 0
        and g["visionchat_num_requests_waiting_frontend"] == 0
        and g["visionchat_kv_cache_usage_perc"] == 0
        and g["visionchat_kv_cache_free_blocks"] == g["visionchat_kv_cache_total_blocks"] > 0
    )


def test_gauges_move_under_load_and_return_to_idle(vc: ServerProcess) -> None:
    vc.wait_idle()
    assert is_idle(gauges(vc)), gauges(vc)
    n, tokens = 3 * MAX_NUM_SEQS, 128
    peak = {k: 0.0 for k in ("visionchat_num_requests_running", "visionchat_num_requests_waiting",
                             "visionchat_num_requests_waiting_frontend", "visionchat_kv_cache_usage_perc")}
    with grpc.insecure_channel(vc.address) as ch, ThreadPoolExecutor(n) as pool:
        stub = vc.stub(ch)
        requests = [generate_request(f"Story {k}.", max_new_tokens=tokens, ignore_eos=True) for k in range(n)]
        futures = [pool.submit(lambda r=r: collect(stub.Generate(r, timeout=180))) for r in requests]
        deadline = time.monotonic() + 180
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            g = gauges(vc)
            for k in peak:
                peak[k] = max(peak[k], g[k])
            time.sleep(0.05)
        results = [f.result(timeout=1) for f in futures]
    assert all(len(ids) == tokens and fin.finish_reason == pb.FINISH_REASON_LENGTH for ids, _, fin in results)
    assert 0 < peak["visionchat_num_requests_running"] <= MAX_NUM_SEQS, peak
    assert peak["visionchat_num_requests_waiting"] > 0, peak
    assert peak["visionchat_num_requests_waiting_frontend"] > 0, peak
    assert 0 < peak["visionchat_kv_cache_usage_perc"] < 1, peak
    wait_for("idle gauges after the load", lambda: is_idle(gauges(vc)), 30)


# --- the JSON request log ---------------------------------------------------------------------------


def test_json_log_has_one_request_finished_line(vc: ServerProcess) -> None:
    request_id = f"metrics-log-{uuid.uuid4().hex[:12]}"
    req = generate_request("Say something.", max_new_tokens=3, ignore_eos=True)
    req.request_id = request_id
    with grpc.insecure_channel(vc.address) as ch:
        _, _, fin = collect(vc.stub(ch).Generate(req, timeout=60))
    assert fin.request_id == request_id

    def records() -> list[dict[str, Any]]:
        out = []
        for line in list(vc.lines):
            if line.startswith("{"):
                record = json.loads(line)  # every JSON-looking line of the server is one whole JSON object
                if record.get("event") == "request_finished" and record.get("request_id") == request_id:
                    out.append(record)
        return out

    wait_for("the request_finished line", records, 10)
    time.sleep(0.3)  # a duplicate would have been written at the same moment
    (record,) = records()
    assert record["level"] == "INFO" and record["logger"] == "visionchat.requests" and record["ts"].endswith("Z")
    assert record["worker"] == "worker0"
    assert record["finish_reason"] == "length"
    assert record["prompt_tokens"] == fin.usage.prompt_tokens > 0
    assert record["image_tokens"] == 0
    assert record["completion_tokens"] == 3
    for key in ("queue_s", "ttft_s", "total_s"):
        assert isinstance(record[key], float), record
    assert 0 <= record["queue_s"] <= record["ttft_s"] <= record["total_s"]
    assert record["queue_s"] == pytest.approx(fin.timings.queue_seconds, abs=1e-5)
    assert record["ttft_s"] == pytest.approx(fin.timings.time_to_first_token_seconds, abs=1e-5)
    assert record["total_s"] == pytest.approx(fin.timings.total_seconds, abs=0.1)


# --- docs/metrics.md and the dashboard match the exposition -----------------------------------------


def doc_table() -> dict[str, dict[str, Any]]:
    """Rows of the metric table: | `name` | type | `label`, ... | help | notes |"""
    rows: dict[str, dict[str, Any]] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\|\s*`((?:visionchat|grpc_server)_\w+)`\s*\|", line)
        if not m:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, f"docs/metrics.md: a metric row needs 5 cells: {line}"
        name = m.group(1)
        assert name not in rows, f"docs/metrics.md lists {name} twice"
        rows[name] = {
            "type": cells[1],
            "labels": set(re.findall(r"`(\w+)`", cells[2])),
            "help": cells[3],
        }
    return rows


def test_docs_list_every_metric_with_its_type_labels_and_help(vc: ServerProcess) -> None:
    families, labels = parse_exposition(vc.metrics_text())
    exposed = documented_families(families)
    rows = doc_table()
    assert sorted(exposed) == sorted(rows), (
        f"in the exposition, not in docs/metrics.md: {sorted(set(exposed) - set(rows))}; "
        f"in docs/metrics.md, not exposed: {sorted(set(rows) - set(exposed))}"
    )
    for name, fam in exposed.items():
        row = rows[name]
        assert row["type"] == fam["type"], f"{name}: docs say {row['type']}, exposed as {fam['type']}"
        assert row["help"] == fam["help"], f"{name}: docs say {row['help']!r}, exposed help is {fam['help']!r}"
        seen = sample_labels(name, fam["type"], labels)
        assert seen is not None, f"{name} has no samples (the module's warm-up should give every family some)"
        assert seen == row["labels"], f"{name}: docs list labels {sorted(row['labels'])}, samples carry {sorted(seen)}"


def test_docs_describe_every_rule_and_alert() -> None:
    text = DOC.read_text()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            assert f"`{name}`" in text, f"docs/metrics.md does not mention {name}"


def test_dashboard_panels_use_exposed_metrics(vc: ServerProcess) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    families, labels = parse_exposition(vc.metrics_text())
    sample_names = set(labels) | set(families)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "job", "instance", "worker"}
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b((?:visionchat|grpc_server)_\w+)\b", target["expr"]))
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= sample_names, f"{panel['title']}: not exposed: {sorted(names - sample_names)}"
            used |= names
    for family in (
        "visionchat_time_to_first_token_seconds_bucket", "visionchat_inter_token_latency_seconds_bucket",
        "visionchat_e2e_request_latency_seconds_bucket", "visionchat_generation_tokens_total",
        "visionchat_num_requests_running", "visionchat_num_requests_waiting", "visionchat_kv_cache_usage_perc",
        "visionchat_num_preemptions_total", "visionchat_worker_restarts_total", "grpc_server_handled_total",
    ):
        assert family in used, f"no dashboard panel shows {family}"
