"""The ``warm``, ``export`` and ``import`` subcommands of ``regproxy`` (argument parsing and
exit codes; the work is in :mod:`proxy.tools.warm` and :mod:`proxy.tools.archive`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from proxy.tools.client import DEFAULT_PROXY, ProxyTLS, ToolError

COMMANDS = ("warm", "export", "import")


def _common(parser: argparse.ArgumentParser) -> None:
    # No REGPROXY_* environment variables here: that prefix belongs to the server's settings.
    parser.add_argument("--proxy", default=DEFAULT_PROXY, metavar="URL",
                        help=f"base URL of the running proxy (default {DEFAULT_PROXY})")
    parser.add_argument("--username", help="user for a proxy that requires a login")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input (with --username)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars (the default when stderr is not a terminal)")
    parser.add_argument("--progress", dest="progress", action="store_true",
                        help="progress bars even when stderr is not a terminal")
    parser.add_argument("--retries", type=int, default=3, help="retries of a failed blob (default 3)")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--ca-file", type=Path, metavar="FILE",
                       help="CA certificate (PEM) that signed an https proxy's certificate, e.g. "
                            "certs/ca.crt of `regproxy certs init` (default: the system's CAs, "
                            "or SSL_CERT_FILE)")
    trust.add_argument("--insecure", action="store_true",
                       help="do not verify an https proxy's certificate")
    parser.set_defaults(listen=None, upstream=None, hosted=None, log_level="WARNING", config=None,
                        data_dir=None)


def _jobs(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def add_parsers(sub: Any) -> None:
    """Register the subcommands on ``regproxy``'s subparsers."""
    warm = sub.add_parser("warm", help="pull images through a running proxy to fill its cache",
                          description="Pull images through the running proxy (manifests, config "
                                      "and layers), discarding the bytes, so the cache is warm "
                                      "before a CI burst. Safe to repeat; cached blobs are fast.")
    warm.add_argument("images", nargs="*", metavar="IMAGE",
                      help="alpine:3.20, ghcr.io/org/img:tag, name@sha256:...")
    warm.add_argument("--from-file", type=Path, metavar="FILE", action="append",
                      help="read images from FILE, one a line ('#' comments); repeatable")
    plat = warm.add_mutually_exclusive_group()
    plat.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]",
                      help="platform child of an index to warm (repeatable; default linux/amd64)")
    plat.add_argument("--all-platforms", action="store_true", help="warm every child of an index")
    warm.add_argument("--jobs", "-j", type=_jobs, default=4, help="blobs fetched at once (default 4)")
    _common(warm)

    export = sub.add_parser("export", help="write images to a docker-load / OCI-layout tarball",
                            description="Write images, fetched through the proxy, to one tar file "
                                        "that docker load, podman load and skopeo "
                                        "(docker-archive: and oci-archive:) accept.")
    export.add_argument("images", nargs="+", metavar="IMAGE")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                        help="the tarball to write")
    export.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="platform to take from an index (default linux/amd64)")
    _common(export)

    imp = sub.add_parser("import", help="push a docker-save or OCI-layout tarball into hosted repositories",
                         description="Push the images of a docker save (manifest.json) or OCI "
                                     "layout (index.json) tarball into hosted repositories of the "
                                     "running proxy; every blob is verified against its digest.")
    imp.add_argument("archive", type=Path, metavar="ARCHIVE")
    imp.add_argument("--repo-prefix", default="", metavar="PREFIX",
                     help="prepended to every repository name, e.g. team/")
    imp.add_argument("--jobs", "-j", type=_jobs, default=4, help="blobs pushed at once (default 4)")
    _common(imp)


def run(args: argparse.Namespace) -> int:
    """Run a tool subcommand; 0 on success, 1 when something failed, 2 for bad arguments."""
    if args.ca_file is not None and not args.ca_file.is_file():
        print(f"regproxy {args.command}: --ca-file {args.ca_file}: no such file", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except ToolError as exc:
        print(f"regproxy {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"regproxy {args.command}: interrupted", file=sys.stderr)
        return 130


async def _run(args: argparse.Namespace) -> int:
    password = None
    if args.password_stdin:
        if args.username is None:
            raise ToolError("--password-stdin needs --username")
        password = (await asyncio.to_thread(sys.stdin.readline)).rstrip("\r\n")
    auth = {"username": args.username, "password": password,
            "tls": ProxyTLS(ca_file=args.ca_file, insecure=args.insecure)}
    if args.command == "warm":
        from proxy.tools.warm import read_image_list, warm

        images = list(args.images)
        for path in args.from_file or []:
            try:
                images += read_image_list(path)
            except OSError as exc:
                raise ToolError(f"{path}: {exc.strerror or exc}") from None
        if not images:
            raise ToolError("no images given (IMAGE arguments or --from-file)")
        report = await warm(images, args.proxy, platforms=args.platform, all_platforms=args.all_platforms,
                            jobs=args.jobs, progress=args.progress, retries=args.retries, **auth)
        for image, why in report.failed:
            print(f"FAILED {image}: {why}", file=sys.stderr)
        print(report.summary())
        return 0 if report.ok else 1
    if args.command == "export":
        from proxy.tools.archive import export_images

        exported = await export_images(args.images, args.output, args.proxy, platform=args.platform,
                                       progress=args.progress, retries=args.retries, **auth)
        print(exported.summary())
        return 0
    if args.command == "import":
        from proxy.tools.archive import import_archive

        result = await import_archive(args.archive, args.proxy, repo_prefix=args.repo_prefix,
                                      jobs=args.jobs, progress=args.progress, retries=args.retries,
                                      **auth)
        for image in result.images:
            print(f"pushed {image}")
        for label, why in result.failed:
            print(f"FAILED {label}: {why}", file=sys.stderr)
        print(result.summary())
        return 0 if result.ok else 1
    raise ToolError(f"unknown command {args.command!r}")
