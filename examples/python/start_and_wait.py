"""Start an Aiki run and wait for its result from Python, over plain gRPC.

Aiki's protocol is ordinary gRPC (proto/aiki/v1/aiki.proto), so any language with a gRPC
library can start runs, read them and wait for their results. This script generates the
Python stubs from the .proto file with grpcio-tools, then starts a run of WORKFLOW with INPUT
(JSON) under an idempotency key, waits for it to end and prints its output as JSON.

    python3 -m pip install grpcio grpcio-tools
    python3 examples/python/start_and_wait.py [--server 127.0.0.1:7070] WORKFLOW INPUT

Exit codes: 0 completed (the output is printed), 3 failed or cancelled, 4 still running.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import uuid

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")


def load_stubs():
    """Generates aiki.v1's messages and stubs into a temporary folder and imports them."""
    out = tempfile.mkdtemp(prefix="aiki-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "aiki/v1/aiki.proto",
        ]
    )
    if status != 0:
        sys.exit(f"cannot generate the stubs from {PROTO_ROOT} (protoc exited {status})")
    sys.path.insert(0, out)
    return (
        importlib.import_module("aiki.v1.aiki_pb2"),
        importlib.import_module("aiki.v1.aiki_pb2_grpc"),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:7070", help="host:port of aiki-server")
    parser.add_argument("--key", help="idempotency key (default: a new one)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds to wait for the result")
    parser.add_argument("workflow")
    parser.add_argument("input", help="the run's input, as JSON")
    args = parser.parse_args()

    pb, rpc = load_stubs()
    runs = rpc.WorkflowServiceStub(grpc.insecure_channel(args.server))

    value = struct_pb2.Value()
    json_format.Parse(args.input, value)
    started = runs.StartRun(
        pb.StartRunRequest(
            workflow=args.workflow,
            input=value,
            idempotency_key=args.key or f"python-{uuid.uuid4()}",
        )
    )
    run_id = started.run.id
    print(f"{'started' if started.created else 'found'} run {run_id}", file=sys.stderr)

    answer = runs.GetRunResult(
        pb.GetRunResultRequest(run_id=run_id, timeout=duration_pb2.Duration(seconds=args.timeout))
    )
    run = answer.run
    status = pb.RunStatus.Name(run.status)
    if not answer.done:
        print(f"run {run_id} is still {status} after {args.timeout}s", file=sys.stderr)
        return 4
    if status != "RUN_STATUS_COMPLETED":
        error = json_format.MessageToDict(run.error)
        print(f"run {run_id} ended {status}: {json.dumps(error)}", file=sys.stderr)
        return 3
    print(json.dumps(json_format.MessageToDict(run.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
