"""A small OTLP trace receiver for the tracing tests: OTLP/gRPC and
OTLP/HTTP (protobuf) on ports of its own, built on the protocol's published
definitions (opentelemetry-proto) and grpcio.

Every span received is written as one JSON line to the output file:
trace and span ids in hex, parent, name, kind, attributes, events, status,
the resource's service.name and which transport carried it. The first line
on stdout is {"grpc": PORT, "http": PORT}.

    otlp_receiver.py OUT_FILE [--grpc-port N] [--http-port N] [--discard] [--forever]

It serves until its stdin closes, or with --forever until it is killed.

--discard (for benchmarks): OTLP/HTTP bodies are read and answered without
being decoded, and nothing is written.
"""

import argparse
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

LOCK = threading.Lock()


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    v = getattr(any_value, kind)
    if kind == "array_value":
        return [value_of(x) for x in v.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in v.values}
    if kind == "bytes_value":
        return v.hex()
    return v


def attributes(kvs):
    return {kv.key: value_of(kv.value) for kv in kvs}


def record(out_path, request, transport, headers):
    lines = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                lines.append(
                    json.dumps(
                        {
                            "transport": transport,
                            "headers": headers,
                            "service_name": resource.get("service.name"),
                            "scope": ss.scope.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": attributes(span.attributes),
                            "events": [
                                {"name": e.name, "attributes": attributes(e.attributes)}
                                for e in span.events
                            ],
                            "status": span.status.code,
                        }
                    )
                )
    with LOCK:
        with open(out_path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out_path):
        self.out_path = out_path

    def Export(self, request, context):
        headers = {k: v for k, v in context.invocation_metadata() if k.startswith("x-")}
        record(self.out_path, request, "grpc", headers)
        return trace_service_pb2.ExportTraceServiceResponse()


def http_handler(out_path, discard=False):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if discard and self.path == "/v1/traces":
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path != "/v1/traces":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-")}
            record(out_path, request, "http", headers)
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--discard", action="store_true")
    parser.add_argument("--forever", action="store_true")
    args = parser.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(args.out), server)
    grpc_port = server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
    server.start()

    ThreadingHTTPServer.daemon_threads = True
    httpd = ThreadingHTTPServer(("127.0.0.1", args.http_port), http_handler(args.out, args.discard))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    print(json.dumps({"grpc": grpc_port, "http": httpd.server_address[1]}), flush=True)
    if args.forever:
        server.wait_for_termination()
        return
    # Until the test kills it, or its stdin closes.
    try:
        sys.stdin.read()
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
