#!/usr/bin/env python3
"""An HTTP/2 client over plain TCP (h2c, prior knowledge) that sends many
requests at once on one connection, the way a busy client multiplexes, and
reports what became of each: its answer, complete or not, or the reset that
refused it; every GOAWAY; and when the server closed the socket. Frames by
hyperframe, headers by hpack (independent of tollgate's HTTP/2 code).

    h2_burst.py --port P --requests K [--path /x] [--rounds R]
                [--ignore-ping] [--wait S] [--every S] [--window N]

Sends K requests at once, then R-1 more bursts of K, each as soon as the
previous burst's answers are in (or right away with --no-wait-rounds),
while the connection is open. With --ignore-ping the client never answers
a PING (a client that ignores the server's GOAWAY round trip). With
--every S a burst starts at most every S seconds. Prints one
JSON object: {"streams": {"1": {"status": 200, "complete": true}, ...},
"goaway": [...], "closed": 1.2, "error": null}.
"""

import argparse
import json
import socket
import time

import hpack
from hyperframe.frame import (
    DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame,
    SettingsFrame, WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--path", default="/")
    ap.add_argument("--ignore-ping", action="store_true")
    ap.add_argument("--wait", type=float, default=20.0)
    ap.add_argument("--every", type=float, default=0.0)
    ap.add_argument("--window", type=int, default=None,
                    help="SETTINGS_INITIAL_WINDOW_SIZE to grant (0: the client reads nothing)")
    a = ap.parse_args()

    sock = socket.create_connection(("127.0.0.1", a.port))
    opened = time.monotonic()
    enc, dec = hpack.Encoder(), hpack.Decoder()
    streams, goaway = {}, []
    state = {"next": 1, "closed": None, "error": None, "rounds": 0, "last": 0.0}

    def now():
        return round(time.monotonic() - opened, 3)

    def send(data):
        try:
            sock.sendall(data)
        except OSError as e:
            if state["closed"] is None:
                state["closed"], state["error"] = now(), type(e).__name__

    def burst():
        state["rounds"] += 1
        state["last"] = time.monotonic()
        out = b""
        for _ in range(a.requests):
            sid = state["next"]
            state["next"] += 2
            block = enc.encode([(":method", "GET"), (":scheme", "http"),
                                (":authority", "localhost"), (":path", a.path)])
            out += HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
            streams[sid] = {"status": None, "complete": False}
        send(out)

    settings = SettingsFrame(0)
    if a.window is not None:
        settings.settings[SettingsFrame.INITIAL_WINDOW_SIZE] = a.window
    send(PREFACE + settings.serialize())
    burst()
    buf = b""
    sock.settimeout(0.2)
    deadline = time.monotonic() + a.wait
    while state["closed"] is None and time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            data = None
        except OSError as e:
            state["closed"], state["error"] = now(), type(e).__name__
            break
        if data is not None and not data:
            state["closed"] = now()
            break
        buf += data or b""
        while len(buf) >= 9:
            f, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            f.parse_body(memoryview(buf[9:9 + length]))
            buf = buf[9 + length:]
            s = streams.get(f.stream_id)
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                send(SettingsFrame(0, flags=["ACK"]).serialize())
            elif isinstance(f, PingFrame) and "ACK" not in f.flags:
                if not a.ignore_ping:
                    send(PingFrame(0, opaque_data=f.opaque_data, flags=["ACK"]).serialize())
            elif isinstance(f, GoAwayFrame):
                goaway.append({"at": now(), "last_stream_id": f.last_stream_id,
                               "error_code": f.error_code})
            elif isinstance(f, HeadersFrame):
                headers = dict(dec.decode(f.data))
                status = headers.get(":status", headers.get(b":status"))
                if s is not None and status is not None and s["status"] is None:
                    s["status"] = int(status)
                if s is not None and "END_STREAM" in f.flags:
                    s["complete"] = True
            elif isinstance(f, DataFrame):
                if f.flow_controlled_length:
                    n = f.flow_controlled_length
                    send(WindowUpdateFrame(0, window_increment=n).serialize()
                         + WindowUpdateFrame(f.stream_id, window_increment=n).serialize())
                if s is not None and "END_STREAM" in f.flags:
                    s["complete"] = True
            elif isinstance(f, RstStreamFrame) and s is not None:
                s["reset"] = f.error_code
        done = all(s["complete"] or "reset" in s for s in streams.values())
        due = time.monotonic() - state["last"] >= a.every
        if done and due and state["rounds"] < a.rounds and not goaway:
            burst()
        elif done and due and state["rounds"] < a.rounds and a.ignore_ping:
            # A client that ignores the GOAWAY keeps sending.
            burst()
    sock.close()
    print(json.dumps({"streams": {str(k): v for k, v in streams.items()},
                      "goaway": goaway, "closed": state["closed"],
                      "error": state["error"]}))


if __name__ == "__main__":
    main()
