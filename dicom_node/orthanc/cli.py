"""``medfinder orthanc config``: write an Orthanc configuration wired to a running node (see ``config``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config.arguments import add_config_arguments, settings_from_args


def cmd_orthanc_config(args: argparse.Namespace) -> int:
    from dicom_node.api.tokens import Scope, TokenError, TokenStore, tokens_path
    from dicom_node.orthanc.config import OrthancConfigRequest, orthanc_json, write_orthanc_config

    settings = settings_from_args(args)
    if args.data_dir:
        settings = settings.model_copy(update={"paths": settings.paths.model_copy(update={"data_dir": args.data_dir})})
    out = Path(args.out)
    request = OrthancConfigRequest(
        out=out, node_url=args.node_url, token_file=Path(args.token_file).resolve(),
        node_ae_title=args.node_aet or settings.node.ae_title,
        node_dicom_port=args.node_dicom_port or settings.node.port or 11112,
        node_dicom_host=args.node_dicom_host, http_port=args.http_port, dicom_port=args.dicom_port,
        ae_title=args.aet, stable_age_s=args.stable_age, route_modalities=tuple(args.route_modality or ("CT",)),
        plugin_library=args.plugin_library, root=Path(args.root) if args.root else None,
        storage=Path(args.storage) if args.storage else None, remote_access=args.remote_access)
    try:
        orthanc_json(request, None)  # refuse a bad request before a token is made
    except ValueError as error:
        print(f"medfinder orthanc config: {error}", file=sys.stderr)
        return 2
    token = None
    if not request.token_file.is_file():
        # The node's read-only token for this Orthanc, made in the node's data folder (the node re-reads it).
        name = f"orthanc-{args.aet.lower()}"
        try:
            token = TokenStore(tokens_path(settings.paths.data_dir)).create(name, [Scope.READ])
        except TokenError as error:
            print(f"medfinder orthanc config: {error} (or pass the token's file with --token-file)", file=sys.stderr)
            return 2
        print(f"made the node token {name!r} (scope read) in {settings.paths.data_dir}; kept in {request.token_file}")
    try:
        files = write_orthanc_config(request, token)
    except (OSError, ValueError) as error:
        print(f"medfinder orthanc config: {error}", file=sys.stderr)
        return 2
    node_host = request.node_dicom_host or "127.0.0.1"
    print(f"wrote {files.config} and {files.plugin}")
    if files.admin_password_file:
        print(f"Orthanc user 'medfinder-admin', password in {files.admin_password_file}")
    print("start it:   Orthanc " + str(files.config))
    print(f"the node sends results to it when served with:   --destination {request.ae_title}@"
          f"{'127.0.0.1' if node_host in ('127.0.0.1', 'localhost') else '<orthanc host>'}:{request.dicom_port} "
          f"--set orthanc.url=http://127.0.0.1:{request.http_port}")
    print(f"then open:  http://127.0.0.1:{request.http_port}/app/explorer.html (a study's page: 'Similar cases')")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    orthanc = subparsers.add_parser("orthanc", help="Orthanc integration: write a configuration wired to the node")
    actions = orthanc.add_subparsers(dest="action", required=True, metavar="ACTION")
    config = actions.add_parser("config",
                                help="write orthanc.json + the MedFinder plugin for `Orthanc DIR/orthanc.json`")
    add_config_arguments(config)
    config.add_argument("--data-dir", help="the node's data folder (where a new token is recorded)")
    config.add_argument("--out", required=True, help="folder to write (orthanc.json, plugin, routing state, db/)")
    config.add_argument("--node-url", required=True, help="the node's REST root as Orthanc reaches it, "
                                                          "e.g. http://127.0.0.1:8080")
    config.add_argument("--token-file", required=True,
                        help="file holding the node token Orthanc uses (made, with a new read token, if missing)")
    config.add_argument("--http-port", type=int, default=8042)
    config.add_argument("--dicom-port", type=int, default=4242)
    config.add_argument("--aet", default="ORTHANC", help="Orthanc's AE title (the node's result destination)")
    config.add_argument("--node-aet", help="the node's AE title (default node.ae_title)")
    config.add_argument("--node-dicom-port", type=int, help="the node's DICOM port (default node.port)")
    config.add_argument("--node-dicom-host", help="the node's DICOM host (default: the host of --node-url)")
    config.add_argument("--stable-age", type=int, default=60,
                        help="seconds without new instances before Orthanc calls a study stable and routes it")
    config.add_argument("--route-modality", action="append", metavar="MOD",
                        help="modalities routed to the node (repeatable; default CT)")
    config.add_argument("--plugin-library", default="/usr/share/orthanc/plugins/libOrthancPython.so",
                        help="Orthanc's Python plugin (default: Debian's orthanc-python)")
    config.add_argument("--root", help="where --out is mounted inside a container (paths in orthanc.json use it)")
    config.add_argument("--storage", help="Orthanc's storage folder (default <root>/db)")
    config.add_argument("--remote-access", action="store_true",
                        help="accept remote HTTP clients, behind a generated user (default: loopback only)")
    config.set_defaults(handler=cmd_orthanc_config)
