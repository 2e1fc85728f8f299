#!/usr/bin/env python3
"""Wait until a Kafka cluster answers a Metadata request that lists at least one broker.

Standard library only, so it runs with any python3 (no virtualenv). Usage:

    kafka_ready.py HOST:PORT[,HOST:PORT...] [--timeout SECONDS] [--pid PID]
                   [--cafile CA.pem [--certfile CERT.pem --keyfile KEY.pem]]

Prints the brokers found ("host:port,...") and exits 0; exits 1 on timeout, 3 as
soon as process PID is gone (2 is argparse's usage error). A KRaft broker opens
its client listener only once it is registered and unfenced, so a non-empty
broker list means clients can use it. With --cafile the listener is a TLS one (the
broker's certificate is checked against that CA and the host name), and --certfile /
--keyfile present a client certificate to a listener that requires one.
"""

import argparse
import socket
import ssl
import struct
import time

# Metadata v4 (api_key 3) asking for no topics: a non-flexible version, which Kafka
# 2.x to 4.x all accept. Header: api_key, api_version, correlation_id, client_id.
CLIENT_ID = b"kafka_ready"
REQUEST = struct.pack(">hhih", 3, 4, 1, len(CLIENT_ID)) + CLIENT_ID + struct.pack(">ib", 0, 0)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        if not (chunk := sock.recv(size - len(data))):
            raise ConnectionError("connection closed mid-response")
        data += chunk
    return data


def brokers(host: str, port: int, tls: ssl.SSLContext | None = None) -> list[str]:
    """The "host:port" of each broker the cluster reports."""
    with (
        socket.create_connection((host, port), timeout=2) as raw,
        tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw as sock,
    ):
        sock.sendall(struct.pack(">i", len(REQUEST)) + REQUEST)
        (size,) = struct.unpack(">i", read_exactly(sock, 4))
        body = read_exactly(sock, size)
    # correlation_id, throttle_time_ms, then brokers: [node_id, host, port, rack (nullable)]
    (count,), pos, found = struct.unpack_from(">i", body, 8), 12, []
    for _ in range(count):
        (host_len,) = struct.unpack_from(">h", body, pos + 4)
        name = body[pos + 6 : pos + 6 + host_len].decode()
        broker_port, rack_len = struct.unpack_from(">ih", body, pos + 6 + host_len)
        pos += 6 + host_len + 6 + max(rack_len, 0)
        found.append(f"{name}:{broker_port}")
    return found


def alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap", help="comma-separated HOST:PORT list")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--pid", type=int, help="give up as soon as this process is gone")
    parser.add_argument("--cafile", help="speak TLS, trusting this CA (PEM)")
    parser.add_argument("--certfile", help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--keyfile", help="its private key (PEM)")
    args = parser.parse_args()
    tls = None
    if args.cafile:
        tls = ssl.create_default_context(cafile=args.cafile)
        if args.certfile:
            tls.load_cert_chain(args.certfile, args.keyfile)
    servers = [s.strip().rpartition(":") for s in args.bootstrap.split(",")]
    if not all(host and port.isdigit() for host, _, port in servers):
        parser.error(f"not a HOST:PORT list: {args.bootstrap!r}")

    deadline = time.monotonic() + args.timeout
    while True:
        for host, _, port in servers:
            try:
                if found := brokers(host, int(port), tls):
                    print(",".join(found))
                    return 0
            except (OSError, ValueError, struct.error):
                pass  # not listening yet, or an unexpected answer: try again
        if args.pid is not None and not alive(args.pid):
            return 3
        if time.monotonic() >= deadline:
            return 1
        time.sleep(0.2)


if __name__ == "__main__":
    raise SystemExit(main())
