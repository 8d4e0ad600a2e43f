"""``regproxy certs ...`` and ``regproxy htpasswd ...``: the edge's command-line tools."""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import sys
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="create a local CA and TLS certificates")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    init = csub.add_parser("init", help="create (or reuse) a CA and issue a server certificate")
    init.add_argument("--host", action="append", default=[], metavar="NAME",
                      help="DNS name clients use (repeatable)")
    init.add_argument("--ip", action="append", default=[], metavar="ADDR",
                      help="IP address clients use (repeatable)")
    init.add_argument("--dir", type=Path, default=Path("certs"), help="output directory (default certs)")
    init.add_argument("--days", type=int, default=397, help="server certificate validity (default 397)")
    init.add_argument("--port", type=int, default=5000, help="port, for the printed instructions")
    client = csub.add_parser("client", help="issue a client certificate for mutual TLS")
    client.add_argument("name", help="client name (certificate CN); writes NAME.cert and NAME.key")
    client.add_argument("--dir", type=Path, default=Path("certs"), help="CA directory (default certs)")
    client.add_argument("--days", type=int, default=397)

    ht = sub.add_parser("htpasswd", help="manage the bcrypt htpasswd file")
    hsub = ht.add_subparsers(dest="htpasswd_command", required=True)
    add = hsub.add_parser("add", help="add a user or change their password")
    add.add_argument("user")
    add.add_argument("--file", type=Path, default=Path("htpasswd"), help="default ./htpasswd")
    add.add_argument("--stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--cost", type=int, default=10, help="bcrypt cost, 4-31 (default 10)")
    rm = hsub.add_parser("remove", help="remove a user")
    rm.add_argument("user")
    rm.add_argument("--file", type=Path, default=Path("htpasswd"), help="default ./htpasswd")
    for p in (certs, init, client, ht, add, rm):
        p.set_defaults(log_level="WARNING")


def run(args: argparse.Namespace) -> int:
    if args.command == "certs":
        return _certs(args)
    return _htpasswd(args)


def _certs(args: argparse.Namespace) -> int:
    from proxy import certs

    if args.certs_command == "client":
        cert, key = certs.issue_client(args.dir, args.name, args.days)
        print(f"client certificate: {cert.resolve()}\nclient key:         {key.resolve()}\n"
              f"Docker and podman use them from certs.d/HOST:PORT/ beside ca.crt; "
              f"containerd: client = [[\"{cert.resolve()}\", \"{key.resolve()}\"]] in hosts.toml")
        return 0
    hosts, ips = list(args.host), list(args.ip)
    for h in list(hosts):  # --host 10.0.0.5 is an address, not a DNS name
        try:
            ipaddress.ip_address(h)
        except ValueError:
            continue
        hosts.remove(h)
        ips.append(h)
    if not hosts and not ips:
        print("regproxy: certs init needs at least one --host or --ip", file=sys.stderr)
        return 2
    try:
        paths = certs.init(args.dir, hosts, ips, args.days)
    except ValueError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
    print(certs.trust_instructions(paths, hosts, ips, args.port))
    return 0


def _htpasswd(args: argparse.Namespace) -> int:
    from proxy.auth.htpasswd import hash_password, update_htpasswd

    user = args.user
    if not user or ":" in user or any(c.isspace() for c in user):
        print(f"regproxy: invalid user name {user!r}", file=sys.stderr)
        return 2
    if args.htpasswd_command == "remove":
        changed = update_htpasswd(args.file, user, None)
        print(f"{'removed' if changed else 'no such user'} {user} in {args.file}")
        return 0 if changed else 1
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {user}: ")
        if getpass.getpass("Again: ") != password:
            print("regproxy: the passwords differ", file=sys.stderr)
            return 1
    if not 4 <= args.cost <= 31:
        print("regproxy: --cost must be between 4 and 31", file=sys.stderr)
        return 2
    try:
        hashed = hash_password(password, args.cost)
    except ValueError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
    update_htpasswd(args.file, user, hashed)
    print(f"set password of {user} in {args.file}")
    return 0
