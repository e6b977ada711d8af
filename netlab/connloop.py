#!/usr/bin/env python3
"""Opens new HTTP connections to a URL in a loop and reports each one, for failure tests.

Usage: connloop.py URL SECONDS TIMEOUT [COUNT [PAUSE]]. COUNT 0 means no limit; PAUSE is
seconds to wait after each connection. Prints one JSON object per connection:
{"t": start time (unix seconds), "s": seconds it took, "ok": bool, "node": answer or
error}. Stops after SECONDS
or after COUNT connections.
"""
import http.client
import json
import sys
import time
import urllib.parse

url = urllib.parse.urlsplit(sys.argv[1])
seconds, timeout = float(sys.argv[2]), float(sys.argv[3])
count = int(sys.argv[4]) if len(sys.argv) > 4 and int(sys.argv[4]) > 0 else None
pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
end = time.time() + seconds
n = 0
while time.time() < end and (count is None or n < count):
    n += 1
    t = time.time()
    try:
        c = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
        c.request("GET", url.path or "/", headers={"Connection": "close"})
        body = c.getresponse().read().decode().strip()
        c.close()
        print(json.dumps({"t": t, "s": time.time() - t, "ok": True, "node": body}), flush=True)
    except Exception as e:  # a refused, reset or timed-out connection is a data point
        print(json.dumps({"t": t, "s": time.time() - t, "ok": False, "node": type(e).__name__}), flush=True)
        time.sleep(0.01)
    if pause:
        time.sleep(pause)
