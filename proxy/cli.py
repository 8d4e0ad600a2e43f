"""The ``regproxy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from proxy import __version__, clientconfig, edgecli, healthcheck, logsetup
from proxy.config import Config, ConfigError, load, parse_duration
from proxy.logsetup import LEVELS
from proxy.storage.backend import open_store
from proxy.storage.gc import GCReport, collect
from proxy.tools import commands as tool_commands
from proxy.units import human_size


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regproxy",
        description="A pull-through caching proxy and private registry for container images.")
    parser.add_argument("--version", action="version", version=f"regproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the registry proxy")
    serve.add_argument("--config", type=Path, help="config.toml (default: embedded defaults)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="override server.listen")
    serve.add_argument("--upstream", metavar="URL", help="URL of the default upstream")
    serve.add_argument("--data-dir", metavar="DIR", help="override storage.root")
    serve.add_argument("--workers", metavar="N", help="override server.workers (a number or auto)")
    serve.add_argument("--hosted", metavar="PATTERN", action="append",
                       help="hosted (push-enabled) repository pattern, e.g. 'team/*' (repeatable)")
    serve.add_argument("--log-level", type=str.upper, choices=LEVELS,
                       help="override server.log_level (default INFO)")
    gc = sub.add_parser("gc", help="remove unreferenced blobs and manifests (safe while serving)")
    gc.add_argument("--config", type=Path, help="config.toml (default: embedded defaults)")
    gc.add_argument("--data-dir", metavar="DIR", help="override storage.root")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed")
    gc.add_argument("--delete-untagged", action="store_true",
                    help="also remove manifests no tag or referrer reaches")
    gc.add_argument("--grace", default="1h",
                    help="keep objects younger than this (default 1h), protects concurrent pushes")
    edgecli.add_parsers(sub)
    clientconfig.add_parser(sub)
    tool_commands.add_parsers(sub)
    healthcheck.add_parser(sub)
    cache = sub.add_parser("cache", help="inspect or purge cached (upstream) content")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, helptext in (("ls", "list cached repositories, tags, sizes and last use"),
                           ("purge", "remove a cached image (NAME:TAG, NAME@DIGEST) or "
                                     "repository (NAME)")):
        p = cache_sub.add_parser(name, help=helptext)
        p.add_argument("--config", type=Path, help="config.toml (default: embedded defaults)")
        p.add_argument("--data-dir", metavar="DIR", help="override storage.root")
        if name == "purge":
            p.add_argument("image", help="local name as listed by `cache ls`, with :tag or "
                                         "@digest; without either, every tag of it")
        p.set_defaults(listen=None, upstream=None, hosted=None, workers=None, log_level="WARNING")
    gc.set_defaults(listen=None, upstream=None, hosted=None, workers=None, log_level="WARNING")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The file (if any) with the command-line overrides applied."""
    config = load(args.config)
    return config.with_overrides(listen=args.listen, upstream=args.upstream, data_dir=args.data_dir,
                                 hosted=args.hosted, workers=args.workers)


def serve(config: Config) -> int:
    """Run the server until SIGINT/SIGTERM; 1 when it cannot start on this host (a port,
    the data directory), 2 when the store cannot be used as configured."""
    from proxy.startup import StartupError, check_listen, prepare_store

    try:  # before anything starts: one line, not a traceback from deep inside
        check_listen(config.listen_host, config.listen_port, reuse_port=config.workers > 1)
        if config.debug_listen is not None:
            check_listen(*config.debug_listen, reuse_port=config.workers > 1,
                         key="server.debug_listen")
        prepare_store(config.storage_root)
    except StartupError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 1
    from proxy import server
    from proxy.layout import LayoutError

    try:
        return server.run(config)
    except StartupError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 1
    except LayoutError as exc:
        print(f"regproxy: storage error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logsetup.configure(args.log_level or "INFO")
    if args.command in ("certs", "htpasswd"):
        return edgecli.run(args)
    if args.command == "client-config":
        return clientconfig.run(args)
    if args.command == "healthcheck":
        return healthcheck.run(args)
    if args.command in tool_commands.COMMANDS:
        return tool_commands.run(args)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"regproxy: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        logsetup.configure(args.log_level or config.log_level, config.log_format)
        return serve(config)
    elif args.command == "gc":
        return run_gc(config, args)
    elif args.command == "cache":
        return run_cache(config, args)
    return 0


def run_cache(config: Config, args: argparse.Namespace) -> int:
    """``regproxy cache ls`` and ``regproxy cache purge IMAGE`` (:mod:`proxy.cachecli`)."""
    from proxy import cachecli

    problem = cachecli.store_problem(config)
    if problem is not None:
        print(f"regproxy: {problem}", file=sys.stderr)
        return 1
    return asyncio.run(cachecli.run(config, args))


def run_gc(config: Config, args: argparse.Namespace) -> int:
    """``regproxy gc``: one mark-and-sweep pass, printing what goes and the bytes freed."""
    try:
        grace = parse_duration("--grace", args.grace)
    except ConfigError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
    from proxy.cachecli import store_problem

    problem = store_problem(config)
    if problem is not None:
        print(f"regproxy: {problem}", file=sys.stderr)
        return 1

    async def gc() -> GCReport | None:
        async with open_store(config, clean=False) as (store, _):
            if config.cluster is None:
                return await collect(store, dry_run=args.dry_run,
                                     delete_untagged=args.delete_untagged, grace=grace)
            from proxy.pullthrough.cluster import Cluster

            assert config.cache_url is not None
            cluster = Cluster(config.cluster, config.cache_url)
            try:  # one GC or eviction pass at a time across the replicas
                async with cluster.exclusive("maintenance") as held:
                    if not held:
                        return None
                    return await collect(store, dry_run=args.dry_run,
                                         delete_untagged=args.delete_untagged, grace=grace)
            finally:
                await cluster.close()

    report = asyncio.run(gc())
    if report is None:
        print("regproxy: another replica is running GC or eviction; try again later",
              file=sys.stderr)
        return 1
    verb = "would delete" if args.dry_run else "deleted"
    for repo, digest in report.untagged:
        print(f"{verb} untagged manifest {repo}@{digest}")
    for digest, size in report.blobs:
        print(f"{verb} blob {digest} ({human_size(size)})")
    print(f"{verb} {len(report.blobs)} blobs, {human_size(report.bytes_freed)}; kept {report.kept}")
    if report.incomplete:
        print(f"aborted {report.incomplete} abandoned uploads to the object store")
    return 0
