#!/usr/bin/env python3
"""Long, paced, checksummed HTTP transfers to a VIP, for the rolling-restart test.

Usage: longconns.py VIP COUNT SPREAD MIN_SECS MAX_SECS BLOB_PATH BLOB_SIZE BLOB_SHA256 SEED

Starts COUNT connections over SPREAD seconds (a quarter of them at once), alternately a
download of BLOB_PATH from nginx on port 80 and an upload of as many random bytes to the upload
sink on port 9000. Each one lasts MIN_SECS to MAX_SECS: the client paces its reads or writes,
and keeps a small receive buffer so that the data on the wire is paced too. Each transfer is
checked by sha256 (the sink answers with the sha256 of what it received). Prints one JSON
object per connection: {"i", "kind", "start", "end" (unix seconds), "ok", "error", "node" (the
server's name, once known), "port" (the client's), "bytes" (moved before the end)}.
"""
import asyncio
import hashlib
import json
import random
import socket
import sys
import time

VIP = sys.argv[1]
COUNT, SPREAD = int(sys.argv[2]), float(sys.argv[3])
MIN_SECS, MAX_SECS = float(sys.argv[4]), float(sys.argv[5])
BLOB_PATH, BLOB_SIZE, BLOB_SHA = sys.argv[6], int(sys.argv[7]), sys.argv[8]
rng = random.Random(int(sys.argv[9]))
UPLOAD = rng.randbytes(BLOB_SIZE)
UPLOAD_SHA = hashlib.sha256(UPLOAD).hexdigest()
CHUNK = 16 * 1024
# A connection that moves no byte for this long counts as broken.
STALL = 15.0


async def connect(port, state):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # No receive-buffer autotuning: the server can run at most this far ahead of the reader.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    s.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (VIP, port)), STALL)
    state["port"] = s.getsockname()[1]
    return await asyncio.open_connection(sock=s)


async def headers(r):
    head = (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), STALL)).decode("latin-1")
    lines = head.split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise RuntimeError(f"status {lines[0]!r}")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    return fields


async def paced(start, done, rate):
    ahead = start + done / rate - time.monotonic()
    if ahead > 0:
        await asyncio.sleep(ahead)


async def download(secs, state):
    r, w = await connect(80, state)
    try:
        w.write(f"GET {BLOB_PATH} HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        h = await headers(r)
        state["node"] = h.get("x-node")
        length = int(h["content-length"])
        digest, got, start, rate = hashlib.sha256(), 0, time.monotonic(), BLOB_SIZE / secs
        while got < length:
            chunk = await asyncio.wait_for(r.read(min(CHUNK, length - got)), STALL)
            if not chunk:
                raise EOFError(f"body ended after {got} of {length} bytes")
            digest.update(chunk)
            got += len(chunk)
            state["bytes"] = got
            await paced(start, got, rate)
        if digest.hexdigest() != BLOB_SHA:
            raise ValueError("sha256 mismatch")
        return h.get("x-node", "?")
    finally:
        w.close()


async def upload(secs, state):
    r, w = await connect(9000, state)
    try:
        w.write(f"POST /up HTTP/1.1\r\nHost: {VIP}\r\nContent-Length: {BLOB_SIZE}\r\n\r\n".encode())
        sent, start, rate = 0, time.monotonic(), BLOB_SIZE / secs
        while sent < BLOB_SIZE:
            w.write(UPLOAD[sent:sent + CHUNK])
            await asyncio.wait_for(w.drain(), STALL)
            sent = min(sent + CHUNK, BLOB_SIZE)
            state["bytes"] = sent
            await paced(start, sent, rate)
        h = await headers(r)
        body = await asyncio.wait_for(r.readexactly(int(h["content-length"])), STALL)
        sha, node = body.decode().split()
        if sha != UPLOAD_SHA:
            raise ValueError("sha256 mismatch")
        return node
    finally:
        w.close()


async def one(i, at, secs):
    await asyncio.sleep(at)
    kind = "download" if i % 2 == 0 else "upload"
    start, state = time.time(), {"node": None, "port": None, "bytes": 0}
    try:
        state["node"] = await (download(secs, state) if kind == "download" else upload(secs, state))
        ok, error = True, None
    except Exception as e:  # a reset, a stall or a bad checksum is what this counts
        ok, error = False, f"{type(e).__name__}: {e}"
    end = time.time()
    print(json.dumps({"i": i, "kind": kind, "start": start, "end": end, "ok": ok, "error": error, **state}), flush=True)


async def main():
    plan, first = [], COUNT // 4
    for i in range(COUNT):
        at = 0.0 if i < first else SPREAD * (i - first + 1) / (COUNT - first)
        plan.append((i, at, rng.uniform(MIN_SECS, MAX_SECS)))
    await asyncio.gather(*(one(*p) for p in plan))


asyncio.run(main())
