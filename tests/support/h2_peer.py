#!/usr/bin/env python3
"""An HTTP/2 client over plain TCP (h2c, prior knowledge) that reports what
each connection's life looked like: the answers, every GOAWAY frame, and
when the server closed the socket. Frames are parsed and built by
hyperframe and headers coded by hpack (the libraries under the `h2`
package): an implementation independent of tollgate's. It speaks at the
frame level because a graceful GOAWAY is not the end of a connection —
answers to requests sent before it still arrive — which higher-level
clients hide.

    h2_peer.py --port P [--connections N] [--path /x] [--requests K]
               [--wait S] [--stagger MS] [--quit-after-answers]

Opens N connections; on each sends K requests one after the other (each
after the previous answer ended), then keeps the connection open and idle
(answering PING and SETTINGS, as clients do) until the server closes it or
S seconds have passed. Prints one JSON object:

    {"connections": [{"answers": [{"status": 200, "at": 0.01, "bytes": 120,
                                   "goaway_before_end": false}],
                      "goaway": [{"at": 2.0, "last_stream_id": 1, "error_code": 0}],
                      "closed": 2.1, "error": null}, ...]}

Times are seconds since the connection was opened. A request reset by the
server, or left without an end when the connection ends, has
`"complete": false`.
"""

import argparse
import json
import selectors
import socket
import time

import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Conn:
    def __init__(self, port, path, requests):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.opened = time.monotonic()
        self.path = path
        self.left = requests
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.next_stream = 1
        self.answers = []
        self.goaway = []
        self.closed = None
        self.error = None
        self.current = None
        self.send(PREFACE + SettingsFrame(0).serialize())
        self.send_next()
        self.sock.setblocking(False)

    def now(self):
        return round(time.monotonic() - self.opened, 3)

    def send(self, data):
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.end(type(e).__name__)
        finally:
            if self.closed is None:
                self.sock.setblocking(False)

    def send_next(self):
        if self.left == 0 or self.goaway:
            return
        self.left -= 1
        sid = self.next_stream
        self.next_stream += 2
        block = self.encoder.encode([
            (":method", "GET"), (":scheme", "http"), (":authority", "localhost"),
            (":path", self.path)])
        frame = HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"])
        self.current = {"stream": sid, "status": None, "bytes": 0, "at": None,
                        "complete": False, "goaway_before_end": False}
        self.send(frame.serialize())

    def finish_current(self, complete):
        if self.current is not None:
            self.current["at"] = self.now()
            self.current["complete"] = complete
            self.answers.append(self.current)
            self.current = None

    def end(self, error=None):
        if self.closed is None:
            self.closed = self.now()
            self.error = error
            self.finish_current(False)

    def readable(self):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            return self.end(type(e).__name__)
        if not data:
            return self.end()
        self.buf += data
        while len(self.buf) >= 9 and self.closed is None:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                break
            frame.parse_body(memoryview(self.buf[9:9 + length]))
            self.buf = self.buf[9 + length:]
            self.on_frame(frame)

    def on_frame(self, f):
        mine = self.current is not None and f.stream_id == self.current["stream"]
        if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
            self.send(SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(f, PingFrame) and "ACK" not in f.flags:
            self.send(PingFrame(0, opaque_data=f.opaque_data, flags=["ACK"]).serialize())
        elif isinstance(f, GoAwayFrame):
            self.goaway.append({"at": self.now(), "last_stream_id": f.last_stream_id,
                                "error_code": f.error_code})
            if self.current is not None:
                self.current["goaway_before_end"] = True
        elif isinstance(f, HeadersFrame) and mine:
            headers = dict(self.decoder.decode(f.data))
            status = headers.get(":status", headers.get(b":status"))
            if status is not None and self.current["status"] is None:
                self.current["status"] = int(status)
            if "END_STREAM" in f.flags:
                self.ended()
        elif isinstance(f, HeadersFrame):
            self.decoder.decode(f.data)  # keeps the decoder's table in step
        elif isinstance(f, DataFrame):
            if mine:
                self.current["bytes"] += len(f.data)
            if f.flow_controlled_length:
                n = f.flow_controlled_length
                self.send(WindowUpdateFrame(0, window_increment=n).serialize()
                          + WindowUpdateFrame(f.stream_id, window_increment=n).serialize())
            if mine and "END_STREAM" in f.flags:
                self.ended()
        elif isinstance(f, RstStreamFrame) and mine:
            self.current["reset"] = f.error_code
            self.finish_current(False)

    def ended(self):
        self.finish_current(True)
        self.send_next()

    def report(self):
        return {"answers": self.answers, "goaway": self.goaway,
                "closed": self.closed, "error": self.error}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--path", default="/")
    ap.add_argument("--requests", type=int, default=1)
    ap.add_argument("--wait", type=float, default=10.0)
    ap.add_argument("--stagger", type=float, default=0.0)
    ap.add_argument("--quit-after-answers", action="store_true",
                    help="stop once every connection has had its answers")
    a = ap.parse_args()
    sel = selectors.DefaultSelector()
    conns = []
    for _ in range(a.connections):
        c = Conn(a.port, a.path, a.requests)
        conns.append(c)
        sel.register(c.sock, selectors.EVENT_READ, c)
        if a.stagger:
            time.sleep(a.stagger / 1000)
    deadline = time.monotonic() + a.wait
    def going(c):
        if c.closed is not None:
            return False
        return not (a.quit_after_answers and c.left == 0 and c.current is None)

    while time.monotonic() < deadline and any(going(c) for c in conns):
        for key, _ in sel.select(timeout=0.05):
            c = key.data
            c.readable()
            if c.closed is not None:
                sel.unregister(c.sock)
                c.sock.close()
    for c in conns:
        if c.closed is None:
            c.finish_current(False)
            c.sock.close()
    print(json.dumps({"connections": [c.report() for c in conns]}))


if __name__ == "__main__":
    main()
