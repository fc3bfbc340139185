"""Bad input, cluster side: addresses of the Jobs API (`submit`, `jobs ...`) and of a Ray cluster
(`pretrain ... cluster.address=...`) that are silent, refused, malformed or missing, and job ids
that are not ids. Each row ends in one line within its bound (a silent peer within 15 s: a TCP
connection within 3 s, then an answer within 5 s, llmtrain/reachable.py) and leaves the run
directory absent. Harness: tests/bad_input.py; {silent} accepts connections and never answers.
"""

from __future__ import annotations

import socket

from bad_input import Case, battery


def _refused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REFUSED = f"127.0.0.1:{_refused_port()}"
JOB = "llmtrain-pretrain-tiny-20260101-120000-1a2b"
SUBMIT = ["submit", "{config}", "data.path={data}", "run.dir={tmp}/run"]
PRETRAIN = ["pretrain", "{config}", "data.path={data}", "run.dir={tmp}/run", "cluster.use_gpu=false"]
RUN = ["{tmp}/run"]
SILENT = "accepts connections but sends no answer within 5 s"
NO_ADDRESS = {"RAY_API_SERVER_ADDRESS": "", "RAY_ADDRESS": ""}

CASES = [
    # The Jobs API at a port that accepts and never answers: every command, within seconds.
    Case("submit-silent", [*SUBMIT, "--address", "http://{silent}"], phrase=SILENT, within_s=15, unchanged=RUN),
    Case("submit-follow-silent", [*SUBMIT, "--follow", "--address", "{silent}"], phrase=SILENT, within_s=15, unchanged=RUN),
    Case("submit-https-silent", [*SUBMIT, "--address", "https://{silent}"], phrase=SILENT, within_s=15, unchanged=RUN),
    Case("jobs-list-silent", ["jobs", "list", "--address", "http://{silent}"], phrase=SILENT, within_s=15),
    Case("jobs-status-silent", ["jobs", "status", JOB, "--address", "http://{silent}"], phrase=SILENT, within_s=15),
    Case("jobs-logs-silent", ["jobs", "logs", JOB, "--address", "http://{silent}"], phrase=SILENT, within_s=15),
    Case(
        "jobs-logs-follow-silent", ["jobs", "logs", JOB, "--follow", "--address", "http://{silent}"], phrase=SILENT, within_s=15
    ),
    Case("jobs-stop-silent", ["jobs", "stop", JOB, "--address", "http://{silent}"], phrase=SILENT, within_s=15),
    # Refused, malformed, missing.
    Case("jobs-list-refused", ["jobs", "list", "--address", f"http://{REFUSED}"], phrase="(Connection refused)", within_s=10),
    Case(
        "jobs-list-refused-from-env",
        ["jobs", "list"],
        phrase="(Connection refused)",
        within_s=10,
        env={"RAY_API_SERVER_ADDRESS": REFUSED},
    ),
    Case("submit-refused", [*SUBMIT, "--address", REFUSED], phrase="(Connection refused)", within_s=10, unchanged=RUN),
    Case(
        "jobs-list-ray-scheme",
        ["jobs", "list", "--address", "ray://{silent}"],
        phrase="ray:// is the Ray Client port",
        within_s=10,
    ),
    Case(
        "submit-ftp-scheme",
        [*SUBMIT, "--address", "ftp://{silent}"],
        phrase="the Jobs API is the dashboard's http address",
        within_s=10,
        unchanged=RUN,
    ),
    Case("jobs-list-bad-port", ["jobs", "list", "--address", "http://127.0.0.1:99999"], phrase="invalid port", within_s=10),
    Case("jobs-list-no-host", ["jobs", "list", "--address", "http://:8265"], phrase="no host name", within_s=10),
    Case("jobs-list-no-address", ["jobs", "list"], phrase="no cluster address: pass --address", within_s=10, env=NO_ADDRESS),
    Case("submit-no-address", SUBMIT, phrase="no cluster address: pass --address", within_s=10, env=NO_ADDRESS, unchanged=RUN),
    # Job ids: missing, or not an id (it would become part of the request's URL path).
    Case("jobs-status-no-id", ["jobs", "status", "--address", "http://{silent}"], phrase="needs a JOB_ID", within_s=10),
    Case(
        "jobs-stop-path-as-id",
        ["jobs", "stop", "../../api/jobs", "--address", "http://{silent}"],
        phrase="is not a job id",
        within_s=10,
    ),
    Case(
        "jobs-logs-id-with-space",
        ["jobs", "logs", "my job", "--address", "http://{silent}"],
        phrase="is not a job id",
        within_s=10,
    ),
    # A config mistake is found before any network call (the silent address is never reached):
    # nothing is uploaded, the run directory is not created.
    Case(
        "submit-config-error-first",
        [*SUBMIT, "train.max_stpes=3", "--address", "http://{silent}"],
        phrase="unknown key (did you mean 'max_steps'?)",
        within_s=10,
        unchanged=RUN,
    ),
    # cluster.address of a run: Ray Client, GCS, wrong scheme, bad port.
    Case("pretrain-ray-silent", [*PRETRAIN, "cluster.address=ray://{silent}"], phrase=SILENT, within_s=15, unchanged=RUN),
    Case("pretrain-gcs-silent", [*PRETRAIN, "cluster.address={silent}"], phrase=SILENT, within_s=15, unchanged=RUN),
    Case(
        "pretrain-ray-refused",
        [*PRETRAIN, f"cluster.address=ray://{REFUSED}"],
        phrase="(Connection refused)",
        within_s=15,
        unchanged=RUN,
    ),
    Case(
        "pretrain-http-scheme",
        [*PRETRAIN, "cluster.address=http://{silent}"],
        phrase="http:// is not a Ray cluster address",
        within_s=15,
        unchanged=RUN,
    ),
    Case("pretrain-ray-no-host", [*PRETRAIN, "cluster.address=ray://:10001"], phrase="no host name", within_s=15, unchanged=RUN),
    Case(
        "pretrain-ray-bad-port",
        [*PRETRAIN, "cluster.address=ray://127.0.0.1:port"],
        phrase="invalid port",
        within_s=15,
        unchanged=RUN,
    ),
]

test_case = battery(CASES)
