"""The ``fedlora deploy`` command line: one argparse parser (``build_parser``, also used by the tests to parse
the Docker/compose commands) and ``main``, which dispatches to certs, flower_config and commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlora.deploy import DeployError
from fedlora.deploy.certs import (CA_CERT, LOCAL_HOSTS, SERVER_CERT, SERVER_KEY, make_certs, make_keys,
                                  stray_ca_key)
from fedlora.deploy.commands import (
    launch,
    node_policy,
    profiles,
    supernode_command,
    superlink_command,
    warn_insecure,
)
from fedlora.deploy.flower_config import DEFAULT_PORT, public_keys, register, write_connection

# `fedlora deploy --help`: the first paragraph is the description, the rest the epilog.
HELP = """``fedlora deploy``: run a real federation on real machines (Flower 1.42 deployment engine).

Secure by default: the SuperLink speaks TLS and only accepts SuperNodes whose public keys were
registered; ``--insecure`` exists for debugging and prints a warning.

  fedlora deploy certs DIR [--hosts 127.0.0.1,localhost,server.example.org] [--ca-key-dir CADIR]
      A self-signed CA and a SuperLink certificate whose SANs are the given hosts (IP and DNS entries).
      Writes   DIR/ca.crt      CA certificate: give it to every SuperNode and to the `flwr` CLI
               DIR/server.pem  SuperLink certificate (signed by the CA)
               DIR/server.key  SuperLink private key (stays on the server)
               CADIR/ca.key    CA private key, OUTSIDE DIR (CADIR defaults to DIR-ca beside DIR): keep it
                               OFFLINE, never on the SuperLink or a node; only needed to issue new certificates
      DIR then holds exactly what the SuperLink needs (`--certs DIR`).
  fedlora deploy keys DIR --nodes N [--connection NAME]
      N SuperNode key pairs for node authentication (ECDSA P-384, OpenSSH format, what Flower accepts):
               DIR/supernode-<i>.key  private key: copy (or mount) it to node i only (`flower-supernode
                                      --auth-supernode-private-key`)
               DIR/supernode-<i>.pub  public key: register it on the SuperLink (`flwr supernode register`);
                                      hand out these single files, never DIR itself (it holds the private keys)
      With --connection the public keys are registered right away against that running SuperLink.
  fedlora deploy register PUBKEY... --connection NAME [--skip-registered]
      Register public keys (files or directories of *.pub) with `flwr supernode register PUBKEY NAME`.
  fedlora deploy connect NAME --superlink HOST:PORT (--ca FILE | --insecure) [--default]
      Write a `[superlink.NAME]` entry into $FLWR_HOME/config.toml so `flwr run . NAME` submits runs.
  fedlora deploy superlink [--certs DIR] [--host 0.0.0.0] [--port 9093] [--insecure] [--no-node-auth]
      Start `flower-superlink` with TLS (DIR/ca.crt, server.pem, server.key: nothing else) and node
      authentication.
  fedlora deploy supernode --superlink HOST:PORT --data PATH --profile NAME [--partition-id I
                           --num-partitions N] [--key FILE] [--ca FILE] [--port P] [--insecure]
                           [--dp-required] [--dp-max-epsilon E] [--dp-max-delta D] [--dp-max-clip C]
                           [--dp-reproducible] [--allow-faults]
      Start `flower-supernode`; its node config carries data-path, profile (and partition-id,
      num-partitions) to the ClientApp, and what the node enforces on its own whatever the server asks:
      a privacy floor (a round with weaker DP-SGD is refused, with its reason), DP noise seeded from the
      run config only with --dp-reproducible, the run's fault injection only with --allow-faults.

`superlink` and `supernode` replace this process with the Flower one (signals reach it directly; in a
container it is PID 1); `--dry-run` prints the command instead. Bad input exits 2 with one sentence.
"""


def _stray_warning(path: Path) -> str:
    return (f"WARNING: {path} is a CA private key inside the certs folder: whatever copies or mounts that folder "
            f"hands it out. Move it offline (the SuperLink needs only {CA_CERT}, {SERVER_CERT} and {SERVER_KEY}).")


def _print_registered(ids: dict[str, int | None]) -> None:
    for pub, nid in ids.items():
        print(f"registered {pub} as node {nid}" if nid is not None else f"already registered: {pub}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # bad input: one sentence, exit 2 (like the rest of the CLI)
        raise DeployError(f"{self.prog}: {message}.")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedlora deploy", description=HELP.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    c = sub.add_parser("certs", help="self-signed CA + SuperLink TLS certificate")
    c.add_argument("dir", type=Path)
    c.add_argument("--hosts", default=",".join(LOCAL_HOSTS),
                   help="comma-separated IPs and DNS names SuperNodes use to reach the SuperLink (SANs)")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--ca-key-dir", type=Path,
                   help="where the CA private key ca.key goes (default: DIR-ca beside DIR; never inside DIR): "
                        "keep it offline")
    c.add_argument("--force", action="store_true", help="replace existing files")

    k = sub.add_parser("keys", help="SuperNode key pairs for node authentication")
    k.add_argument("dir", type=Path)
    k.add_argument("--nodes", type=int, required=True)
    k.add_argument("--start", type=int, default=1, help="number of the first key (supernode-<start>.key)")
    k.add_argument("--connection", help="also register the public keys on this running SuperLink connection")
    k.add_argument("--force", action="store_true")

    r = sub.add_parser("register", help="register SuperNode public keys on a running SuperLink")
    r.add_argument("pubkeys", nargs="+", help="*.pub files or directories holding them")
    r.add_argument("--connection", required=True, help="connection name in $FLWR_HOME/config.toml")
    r.add_argument("--skip-registered", action="store_true", help="keys the SuperLink already knows are not an error")

    n = sub.add_parser("connect", help="a [superlink.NAME] entry for `flwr run . NAME`")
    n.add_argument("name")
    n.add_argument("--superlink", required=True, help="HOST:PORT")
    n.add_argument("--ca", type=Path, help="the federation's ca.crt")
    n.add_argument("--insecure", action="store_true")
    n.add_argument("--default", action="store_true", help="also make it the default connection")

    s = sub.add_parser("superlink", help="start the SuperLink (TLS + node authentication)")
    s.add_argument("--certs", type=Path, help="directory with ca.crt, server.pem, server.key")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--insecure", action="store_true")
    s.add_argument("--no-node-auth", action="store_true", help="accept any SuperNode (not recommended)")
    s.add_argument("--database", help="SQLite file for the SuperLink state (default: in memory)")
    s.add_argument("--log-file")
    s.add_argument("--dry-run", action="store_true")

    m = sub.add_parser("supernode", help="start a SuperNode with this machine's data")
    m.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    m.add_argument("--data", required=True, help="this node's data: a file or folder the loaders accept")
    m.add_argument("--profile", required=True, help=f"hardware profile (conf/client): {', '.join(profiles())}")
    m.add_argument("--partition-id", type=int)
    m.add_argument("--num-partitions", type=int)
    m.add_argument("--key", type=Path, help="this node's private key (supernode-<i>.key)")
    m.add_argument("--ca", type=Path, help="the federation's ca.crt")
    m.add_argument("--insecure", action="store_true")
    m.add_argument("--port", type=int, default=9094, help="local ClientApp runtime port (one per SuperNode on a host)")
    m.add_argument("--max-retries", type=int)
    m.add_argument("--max-wait-time", type=float)
    m.add_argument("--dp-required", action="store_true", help="train only under DP-SGD (privacy=dp_sgd)")
    m.add_argument("--dp-max-epsilon", type=float, help="the largest epsilon a run may plan for this node")
    m.add_argument("--dp-max-delta", type=float, help="the largest delta a run may plan for this node")
    m.add_argument("--dp-max-clip", type=float, help="the largest per-example clipping norm a run may ask for")
    m.add_argument("--dp-reproducible", action="store_true",
                   help="allow DP noise seeded from the run config (tests only: the server can regenerate it)")
    m.add_argument("--allow-faults", action="store_true", help="obey the run's debug.* fault injection")
    m.add_argument("--dry-run", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "certs":
        res = make_certs(args.dir, args.hosts, args.days, args.force, args.ca_key_dir)
        print(f"CA and SuperLink certificate for {', '.join(res['dns'] + res['ips'])} (valid until "
              f"{res['not_after']}) in {args.dir}:\n"
              f"  {CA_CERT}      give to every SuperNode (--ca) and to `fedlora deploy connect --ca`\n"
              f"  {SERVER_CERT}, {SERVER_KEY}  stay on the SuperLink (`fedlora deploy superlink --certs {args.dir}`)\n"
              f"CA private key: {res['files']['ca_key']}\n"
              f"  written OUTSIDE {args.dir} on purpose: keep it OFFLINE (e.g. move it to an encrypted USB stick).\n"
              f"  Never copy or mount it onto the SuperLink or a SuperNode; it is needed only to issue new "
              f"certificates.")
        if res["stray_ca_key"]:
            print(_stray_warning(Path(res["stray_ca_key"])), file=sys.stderr)
        return 0
    if args.cmd == "keys":
        pairs = make_keys(args.dir, args.nodes, args.force, args.start)
        for priv, pub in pairs:
            print(f"  {priv}  -> node only (--key)   {pub.name} -> register on the SuperLink")
        if args.connection:
            _print_registered(register([pub for _, pub in pairs], args.connection))
        else:
            print(f"register them: fedlora deploy register {args.dir} --connection NAME "
                  f"(or: flwr supernode register {pairs[0][1]} NAME)")
        return 0
    if args.cmd == "register":
        _print_registered(register(public_keys(args.pubkeys), args.connection, skip_registered=args.skip_registered))
        return 0
    if args.cmd == "connect":
        path = write_connection(args.name, args.superlink, args.ca, args.insecure, args.default)
        if args.insecure:
            warn_insecure("the SuperLink's identity is not checked")
        print(f"[superlink.{args.name}] -> {args.superlink} written to {path}; submit runs with "
              f"`flwr run . {args.name} --stream`")
        return 0
    if args.cmd == "superlink":
        cmd = superlink_command(args.certs, args.host, args.port,
                                args.insecure, not args.no_node_auth, args.database, args.log_file)
        if args.insecure:
            warn_insecure("any SuperNode can join (node authentication needs TLS)")
        elif args.no_node_auth:
            print("WARNING: --no-node-auth: any SuperNode that trusts the CA can join.", file=sys.stderr)
        if args.certs is not None and (stray := stray_ca_key(args.certs)):
            print(_stray_warning(stray), file=sys.stderr)
        return launch(cmd, args.dry_run)
    if args.cmd == "supernode":
        policy = node_policy(args.dp_required, args.dp_max_epsilon, args.dp_max_delta, args.dp_max_clip,
                             args.dp_reproducible, args.allow_faults)
        cmd = supernode_command(args.superlink, args.data, args.profile, args.partition_id, args.num_partitions,
                                args.key, args.ca, args.insecure, args.port, args.max_retries, args.max_wait_time,
                                policy=policy)
        if args.insecure:
            warn_insecure("the SuperLink's identity is not checked")
        elif args.key is None:
            print("note: no --key: a SuperLink with node authentication (the default) will refuse this node.",
                  file=sys.stderr)
        return launch(cmd, args.dry_run)
    raise DeployError(f"unknown deploy command {args.cmd!r}.")  # argparse already refuses this
