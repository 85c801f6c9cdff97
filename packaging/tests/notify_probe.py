#!/usr/bin/env python3
"""Plays systemd's side of sd_notify for a smoke test.

    notify_probe.py SOCKET LOG SECONDS

Binds a Unix datagram socket at SOCKET (mode 0666, so a daemon running as
another user can reach it), appends every message it receives to LOG, one
message per line with newlines inside it turned into spaces, and exits after
SECONDS. The caller starts the daemon with NOTIFY_SOCKET=SOCKET and reads LOG
for READY=1 and WATCHDOG=1.
"""

import os
import socket
import sys
import time


def main():
    path, log, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    deadline = time.monotonic() + seconds
    with open(log, "a", encoding="utf-8") as out:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data = sock.recv(4096)
            except socket.timeout:
                break
            out.write(data.decode("utf-8", "replace").replace("\n", " ") + "\n")
            out.flush()
    sock.close()
    os.unlink(path)


if __name__ == "__main__":
    main()
