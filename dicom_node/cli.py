"""``medfinder serve``, ``medfinder studies``, ``medfinder deliveries``, ``medfinder token``, ``medfinder ui
link`` and ``medfinder reindex``: run the node, look inside it, manage the REST API's bearer tokens, hand out
signed page links and upgrade its model (``dicom_node.lifecycle.cli``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from datetime import datetime
from typing import Any

from config.arguments import add_config_arguments, settings_from_args
from config.settings import AllowedSource, Destination, Settings


def _allowed(text: str) -> AllowedSource:
    try:
        return AllowedSource.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _destination(text: str) -> Destination:
    try:
        return Destination.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def node_settings(args: argparse.Namespace) -> Settings:
    """The config file and ``--set`` overrides, then the administrator's flags on top."""
    settings = settings_from_args(args)
    node: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        node["port"] = args.port
    if getattr(args, "ae_title", None):
        node["ae_title"] = args.ae_title
    if getattr(args, "bind", None):
        node["bind"] = args.bind
    if getattr(args, "quiet_seconds", None) is not None:
        node["quiet_seconds"] = args.quiet_seconds
    if getattr(args, "allow_ae", None):
        node["allow"] = [a.model_dump() for a in args.allow_ae]
    if getattr(args, "destination", None):
        node["destinations"] = [d.model_dump() for d in args.destination]
    data = settings.model_dump(mode="json")
    data["node"].update(node)
    for flag, field in (("tls_cert", "cert_file"), ("tls_key", "key_file"), ("tls_ca", "ca_file")):
        if getattr(args, flag, None):
            data["node"]["tls"][field] = getattr(args, flag)
    if getattr(args, "http_port", None) is not None:
        data["api"]["http_port"] = args.http_port
    if getattr(args, "http_bind", None):
        data["api"]["http_bind"] = args.http_bind
    if getattr(args, "data_dir", None):
        data["paths"]["data_dir"] = str(args.data_dir)
    if getattr(args, "mode", None):
        data["workers"]["mode"] = args.mode
    return Settings.model_validate(data)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="the node's data folder (spool, state, index, results); "
                                           "default paths.data_dir")


# pynetdicom logs every C-STORE at INFO and dumps whole datasets (names, ids) at DEBUG; highdicom narrates
# every copied module; pydicom's warnings about malformed values quote those values. Our own event= lines say what
# an operator needs, without PHI.
CHATTY_LOGGERS = ("pynetdicom", "highdicom")
QUOTING_LOGGERS = ("pydicom",)  # errors only


def _tls_problem(settings: Settings) -> str | None:
    """Why the TLS settings cannot work (checked before anything listens), or None."""
    tls = settings.node.tls
    if settings.api.https and settings.api.http_port and not tls.enabled:
        return "api.https needs node.tls.cert_file and node.tls.key_file (--tls-cert, --tls-key)"
    for name, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file), ("ca_file", tls.ca_file)):
        if path and not os.path.isfile(path):
            return f"node.tls.{name}: no such file: {path}"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from dicom_node.node import Node
    from model_export.errors import BundleError

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in QUOTING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from workers.index import IndexMismatchError

    settings = node_settings(args)
    problem = _tls_problem(settings)
    if problem:
        print(f"medfinder serve: {problem}", file=sys.stderr)
        return 2
    try:
        node = Node(settings)
    except (BundleError, IndexMismatchError) as error:
        print(f"medfinder serve: {error}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        node.start()
    except OSError as error:  # a port in use: say which and leave cleanly
        node.stop()
        print(f"medfinder serve: {error.strerror or error}", file=sys.stderr)
        return 2
    tls = settings.node.tls
    tls_options = "" if not tls.enabled else (
        f" +tls CLIENT_KEY CLIENT_CERT +cf {tls.ca_file}" if tls.ca_file else " +tla +cf ISSUER_OF_OUR_CERT")
    print(f"MedFinder node listening: AE title {settings.node.ae_title} on {settings.node.bind}:{node.scp.port} "
          f"{'over TLS ' if tls.enabled else ''}({settings.workers.mode} mode, data in {node.layout.root}). "
          f"Try: echoscu{tls_options} -aec {settings.node.ae_title} 127.0.0.1 {node.scp.port}", flush=True)
    if node.http is not None:
        print(f"REST API listening: {node.http.url}/api/v1 (OpenAPI at {node.http.url}/docs; tokens: medfinder "
              f"token create --scope read --name NAME --data-dir {node.layout.root})", flush=True)
        print(f"Similar cases pages: {node.http.url}/ui/ (sign in with a read token, or open a study's page from "
              f"`medfinder ui link STUDY_UID --data-dir {node.layout.root}`)", flush=True)
    else:
        print("REST API off (--http-port 0)", flush=True)
    if node.bundle_id is None:
        print("No model bundle active yet: studies are received and stored, queries answer 503; they are embedded "
              "as soon as a bundle is activated (medfinder bundle install --activate PATH, or medfinder bundle "
              f"activate ID, with --data-dir {node.layout.root})", flush=True)
    while not stopping.wait(0.5):
        pass
    node.stop()
    return 0


def _when(value: float | None) -> str:
    return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds") if value else "-"


def cmd_studies(args: argparse.Namespace) -> int:
    from dicom_node.store.layout import NodeLayout
    from dicom_node.store.state import StateStore

    settings = node_settings(args)
    layout = NodeLayout.create(settings.paths.data_dir)
    store = StateStore(layout.state_db)
    studies = store.studies()
    if args.json:
        rows = [{**study.__dict__, "state": study.state.value,
                 "deliveries": [{**d.__dict__, "state": d.state.value} for d in store.deliveries(study.study_uid)]}
                for study in studies]
        print(json.dumps(rows, indent=2))
        return 0
    if not studies:
        print(f"no studies received yet in {layout.root}")
        return 0
    for study in studies:
        reason = f"  reason: {study.reason}" if study.reason else ""
        if not reason and study.selection:
            reason = f"  embedded: {json.loads(study.selection).get('reason', '')}"
        print(f"{study.study_uid}  {study.state.value:<12} v{study.version}  {study.n_instances} instance(s)  "
              f"from {study.calling_ae or '?'}  last received {_when(study.last_received)}{reason}")
        for delivery in store.deliveries(study.study_uid):
            error = f"  last error: {delivery.last_error}" if delivery.last_error else ""
            print(f"    SR v{delivery.version} -> {delivery.destination}: {delivery.state.value} "
                  f"(attempts {delivery.attempts}, status {delivery.last_status or '-'}, "
                  f"delivered {_when(delivery.delivered_at)}){error}")
    store.close()
    return 0


def cmd_deliveries(args: argparse.Namespace) -> int:
    from dicom_node.store.layout import NodeLayout
    from dicom_node.store.state import DeliveryState, StateStore

    settings = node_settings(args)
    store = StateStore(NodeLayout.create(settings.paths.data_dir).state_db)
    if args.action == "retry":
        ids = args.ids or [d.id for d in store.deliveries(state=DeliveryState.DEAD)]
        retried = [i for i in ids if store.retry_delivery(int(i))]
        print(f"retrying {len(retried)} dead deliver{'y' if len(retried) == 1 else 'ies'}: {retried}")
        return 0 if len(retried) == len(ids) else 1
    state = DeliveryState(args.state) if args.state else None
    for delivery in store.deliveries(state=state):
        print(f"{delivery.id:>5}  {delivery.state.value:<9} {delivery.destination}  study {delivery.study_uid} "
              f"v{delivery.version}  attempts {delivery.attempts}  {delivery.last_error or ''}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Bearer tokens of the REST API: the token is printed once, alone on the last line of standard output."""
    from dicom_node.api.tokens import TokenError, TokenStore, tokens_path

    settings = node_settings(args)
    store = TokenStore(tokens_path(settings.paths.data_dir))
    try:
        if args.action == "create":
            token = store.create(args.name, args.scope)
            scopes = ", ".join(dict.fromkeys(args.scope))
            print(f"Token {args.name!r} created (scopes: {scopes}), stored hashed in {store.path}.")
            print("It is shown only now; keep it secret. Use it as 'Authorization: Bearer <token>':")
            print(token, flush=True)
        elif args.action == "revoke":
            store.revoke(args.name)
            print(f"Token {args.name!r} revoked; the running node refuses it from the next request on.")
        else:
            records = store.records()
            if not records:
                print(f"no tokens in {store.path}")
            for record in records:
                print(f"{record.name:<24} {','.join(s.value for s in record.scopes):<20} created {record.created}")
    except TokenError as error:
        print(f"medfinder token: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_ui_link(args: argparse.Namespace) -> int:
    """A signed link to a study's "Similar cases" page: opens without a token until it expires."""
    from dicom_node.api.ui.signing import load_or_create_key, signed_link, ui_key_path
    from workers.dicom_uids import InvalidUIDError, check_uid

    settings = node_settings(args)
    try:
        study_uid = check_uid(args.study_uid, "StudyInstanceUID")
    except InvalidUIDError as error:
        print(f"medfinder ui link: {error}", file=sys.stderr)
        return 2
    ttl = args.ttl if args.ttl is not None else settings.ui.link_ttl_s
    if ttl < 1:
        print("medfinder ui link: --ttl must be at least 1 second", file=sys.stderr)
        return 2
    host = settings.api.http_bind
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is no address to browse to
    scheme = "https" if settings.api.https else "http"
    base_url = args.base_url or f"{scheme}://{f'[{host}]' if ':' in host else host}:{settings.api.http_port}"
    key = load_or_create_key(ui_key_path(settings.paths.data_dir))
    print(signed_link(key, base_url, study_uid, ttl), flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the DICOM node (receive, embed, index, report)")
    add_config_arguments(serve)
    add_data_dir(serve)
    serve.add_argument("--port", type=int, help="DICOM port (default 11112)")
    serve.add_argument("--ae-title", help="our AE title (default MEDFINDER)")
    serve.add_argument("--bind", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--quiet-seconds", type=float, help="a study is complete after this long without instances")
    serve.add_argument("--allow-ae", type=_allowed, action="append", metavar="AET[@IP[:PORT]]",
                       help="calling AE allowed to send (repeatable); @IP binds it to a source address, :PORT is "
                            "where it takes results")
    serve.add_argument("--destination", type=_destination, action="append", metavar="AET@HOST:PORT",
                       help="where Structured Reports go (repeatable; default: back to the sender)")
    serve.add_argument("--mode", choices=("embedded", "distributed"),
                       help="embedded (default): all in this process; distributed: Celery workers via Redis")
    serve.add_argument("--http-port", type=int, help="REST API port (default 8080; 0 = off)")
    serve.add_argument("--http-bind", help="REST API address (default 127.0.0.1)")
    serve.add_argument("--tls-cert", metavar="FILE", help="DICOM TLS: our certificate (PEM; node.tls.cert_file); "
                                                          "the REST API uses it too with --set api.https=true")
    serve.add_argument("--tls-key", metavar="FILE", help="DICOM TLS: our private key (PEM, unencrypted)")
    serve.add_argument("--tls-ca", metavar="FILE", help="DICOM TLS: CA certificates (PEM); clients must present a "
                                                        "certificate they signed, TLS destinations are checked "
                                                        "against them")
    serve.set_defaults(handler=cmd_serve)

    studies = subparsers.add_parser("studies", help="list received studies, their state and result deliveries")
    add_config_arguments(studies)
    add_data_dir(studies)
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    studies.set_defaults(handler=cmd_studies)

    deliveries = subparsers.add_parser("deliveries", help="list SR deliveries or retry dead ones")
    add_config_arguments(deliveries)
    add_data_dir(deliveries)
    deliveries.add_argument("action", choices=("list", "retry"), nargs="?", default="list")
    deliveries.add_argument("ids", nargs="*", type=int, help="delivery ids to retry (default: every dead one)")
    deliveries.add_argument("--state", choices=("pending", "delivered", "dead"), help="list only this state")
    deliveries.set_defaults(handler=cmd_deliveries)

    token = subparsers.add_parser("token", help="bearer tokens of the REST API: create, list, revoke")
    token_actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = token_actions.add_parser("create", help="make a token (printed once, alone on the last line)")
    create.add_argument("--name", required=True, help="who or what uses it (shown in the audit trail)")
    create.add_argument("--scope", required=True, action="append", choices=("read", "report", "admin"),
                        help="read: studies and searches; report: attach reports; admin: everything (repeatable)")
    listing = token_actions.add_parser("list", help="names, scopes and creation times (never the tokens)")
    revoke = token_actions.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("name")
    for parser in (create, listing, revoke):
        add_config_arguments(parser)
        add_data_dir(parser)
        parser.set_defaults(handler=cmd_token)

    ui = subparsers.add_parser("ui", help="the \"Similar cases\" pages: signed links")
    ui_actions = ui.add_subparsers(dest="action", required=True, metavar="ACTION")
    link = ui_actions.add_parser("link", help="print a signed URL of a study's page (opens without a token until "
                                             "it expires; anyone holding it can open the pages)")
    link.add_argument("study_uid", metavar="STUDY_UID", help="StudyInstanceUID")
    link.add_argument("--ttl", type=int, help="seconds the link stays valid (default ui.link_ttl_s, 24 h)")
    link.add_argument("--base-url", help="the node's REST root as browsers reach it (default "
                                         "http://<api.http_bind>:<api.http_port>)")
    add_config_arguments(link)
    add_data_dir(link)
    link.set_defaults(handler=cmd_ui_link)

    from dicom_node.lifecycle import cli as reindex_cli

    reindex_cli.register(subparsers)
