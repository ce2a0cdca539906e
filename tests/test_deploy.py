"""Deployment: `fedlora deploy` certificates, keys, connection and launch commands, then a real secured
federation on loopback -- a SuperLink with TLS and node authentication, three SuperNodes with registered
keys reading SST-2 partitions from their node config, 2 rounds of FFA-LoRA on tiny_llama submitted with
`flwr run` -- and the two refusals: an unregistered key, and a SuperNode that lacks the federation's CA.

The SuperLink/SuperNodes are started with the same `fedlora deploy superlink|supernode` commands the Docker
images use as entry points, so this is also the host-side check of those entry points. Every process is
started and stopped by PID (module fixture finalizer), including the ones Flower starts below them.

A second secured federation has a SuperNode SIGKILLed mid-round (issue 20 item 4b). The two federated runs mostly
wait on Flower (a fresh ClientApp process per message, polling, a killed node declared lost): both start in
background threads with the module's first test (fixture ``_long_runs_start_first``) and overlap the other tests;
their own tests wait for them and check what they recorded.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, SST2, fedlora_cmd
from federation import LocalFederation, free_port

from fedlora.deploy.certs import default_ca_key_dir, key_paths
from fedlora.deploy.flower_config import flwr_bin

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the loopback deployment is rehearsed on Linux only")


def deploy_cmd(*args, env=None, cwd=None, timeout=120):
    return subprocess.run(fedlora_cmd("deploy", *args), capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# Certificates, keys, connection (no processes)
# ------------------------------------------------------------------------------------------------
def test_certs_have_the_sans_and_chain_to_the_ca(tmp_path):
    from cryptography import x509

    p = deploy_cmd("certs", str(tmp_path), "--hosts", "localhost,10.1.2.3,server.lan")
    assert p.returncode == 0, p.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "server.lan"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}  # 127.0.0.1 always
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (default_ca_key_dir(tmp_path) / "ca.key", tmp_path / "server.key"):
        assert key.stat().st_mode & 0o077 == 0, f"{key} is readable by others"
    assert not (tmp_path / "ca.key").exists()  # the CA key stays out of the folder the SuperLink gets
    again = deploy_cmd("certs", str(tmp_path))
    assert again.returncode == 2 and "--force" in again.stderr  # never silently replaces a federation's CA
    bad = deploy_cmd("certs", str(tmp_path / "x"), "--hosts", "not a host!")
    assert bad.returncode == 2 and "neither an IP address nor a DNS name" in bad.stderr


def test_keys_are_what_flower_node_auth_accepts(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    p = deploy_cmd("keys", str(tmp_path), "--nodes", "2")
    assert p.returncode == 0, p.stderr
    for i in (1, 2):
        priv, pub = key_paths(tmp_path, i)
        key = load_ssh_private_key(priv.read_bytes(), None)  # what flower-supernode does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert priv.stat().st_mode & 0o077 == 0
        assert try_load_public_key(pub)  # Flower's own check in `flwr supernode register`
    wrong = tmp_path / "rsa"
    wrong.write_text("not a key")
    bad = deploy_cmd("supernode", "--superlink", "127.0.0.1:9093", "--data", str(SST2), "--profile", "cpu",
                     "--ca", str(tmp_path / "supernode-1.pub"), "--key", str(wrong), "--dry-run")
    assert bad.returncode == 2 and "OpenSSH EC private key" in bad.stderr


def test_connection_entry_is_read_by_flower(tmp_path):
    from flwr.cli.flower_config import read_superlink_connection

    assert deploy_cmd("certs", str(tmp_path / "c")).returncode == 0
    p = deploy_cmd("connect", "edge", "--superlink", "10.0.0.2:9093", "--ca", str(tmp_path / "c" / "ca.crt"))
    assert p.returncode == 0, p.stderr
    p = deploy_cmd("connect", "debug", "--superlink", "127.0.0.1:9093", "--insecure")
    assert p.returncode == 0 and "WARNING" in p.stderr
    conn = read_superlink_connection("edge")
    assert conn.address == "10.0.0.2:9093" and not conn.insecure
    assert conn.root_certificates == str((tmp_path / "c" / "ca.crt").resolve())
    assert read_superlink_connection("debug").insecure
    assert read_superlink_connection("local").address == ":local:"  # Flower's defaults are kept
    neither = deploy_cmd("connect", "x", "--superlink", "10.0.0.2:9093")
    assert neither.returncode == 2 and "--ca" in neither.stderr


def test_launch_commands_are_secure_by_default(tmp_path):
    from flwr.common.config import parse_config_args

    assert deploy_cmd("certs", str(tmp_path)).returncode == 0
    link = deploy_cmd("superlink", "--certs", str(tmp_path), "--dry-run")
    assert link.returncode == 0, link.stderr
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in link.stdout
    no_certs = deploy_cmd("superlink", "--dry-run")
    assert no_certs.returncode == 2 and "--certs" in no_certs.stderr and "--insecure" in no_certs.stderr
    insecure = deploy_cmd("superlink", "--insecure", "--dry-run")
    assert (insecure.returncode == 0 and "WARNING" in insecure.stderr
            and "--enable-supernode-auth" not in insecure.stdout)

    node = deploy_cmd("supernode", "--superlink", "127.0.0.1:9093", "--data", str(SST2), "--profile",
                      "jetson_orin_nano_8gb", "--partition-id", "1", "--num-partitions", "3",
                      "--ca", str(tmp_path / "ca.crt"), "--dry-run")
    assert node.returncode == 0, node.stderr
    argv = __import__("shlex").split(node.stdout)
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    cfg = parse_config_args([argv[argv.index("--node-config") + 1]])  # exactly how flower-supernode parses it
    assert cfg == {"partition-id": 1, "num-partitions": 3, "data-path": str(SST2.resolve()),
                   "profile": "jetson_orin_nano_8gb"}
    assert "no --key" in node.stderr  # told that an authenticating SuperLink will refuse it
    for args, msg in ((["--profile", "gpu9000"], "unknown --profile"), (["--partition-id", "0"], "go together"),
                      (["--data", str(tmp_path / "missing.tsv")], "does not exist on this machine"),
                      (["--superlink", "https://h:1"], "HOST:PORT")):
        base = {"--superlink": "127.0.0.1:9093", "--data": str(SST2), "--profile": "cpu"}
        extra = dict(zip(args[::2], args[1::2]))
        argv = [x for k, v in {**base, **extra}.items() for x in (k, v)]
        p = deploy_cmd("supernode", *argv, "--ca", str(tmp_path / "ca.crt"), "--dry-run")
        assert p.returncode == 2 and msg in p.stderr, (args, p.stderr)
    no_ca = deploy_cmd("supernode", "--superlink", "127.0.0.1:9093", "--data", str(SST2), "--profile", "cpu",
                       "--dry-run")
    assert no_ca.returncode == 2 and "--ca FILE is required" in no_ca.stderr


def test_trust_2_supernode_floor_flags_reach_the_node_config(tmp_path):
    """`fedlora deploy supernode --dp-*`: the floor is in the node config Flower hands the ClientApp, exactly as
    clients/node.py reads it; a bad value stops the launch with one sentence."""
    from flwr.common.config import parse_config_args

    from fedlora.clients.node import NodeSettings

    base = ["--superlink", "127.0.0.1:9093", "--data", str(SST2), "--profile", "cpu", "--insecure", "--dry-run"]
    node = deploy_cmd("supernode", *base, "--dp-max-epsilon", "3", "--dp-max-delta", "1e-5", "--dp-max-clip", "1",
                      "--allow-faults")
    assert node.returncode == 0, node.stderr
    argv = __import__("shlex").split(node.stdout)
    settings = NodeSettings.of(parse_config_args([argv[argv.index("--node-config") + 1]]))
    assert (settings.floor.required, settings.floor.max_epsilon, settings.floor.max_delta, settings.floor.max_clip,
            settings.allow_faults, settings.reproducible) == (True, 3.0, 1e-5, 1.0, True, False)
    bad = deploy_cmd("supernode", *base, "--dp-max-delta", "2")
    assert bad.returncode == 2 and "--dp-max-delta=2.0 must be a number between 0 and 1" in bad.stderr


# ------------------------------------------------------------------------------------------------
# Secured federations on loopback; their two runs go on in the background
# ------------------------------------------------------------------------------------------------
DP_FLOOR_TEST = "test_deployed_run_completes_while_a_node_with_a_dp_floor_refuses"
KILLED_TEST = "test_robust_4b_a_supernode_killed_mid_round_is_named_alone"
#: folder whose sitecustomize.py makes a SuperNode declare a 10 s heartbeat interval (see that file)
FAST_HEARTBEAT = Path(__file__).resolve().parent / "fast_heartbeat"
HEARTBEAT_MARKER = "fedlora-test: heartbeat interval"


class Background(threading.Thread):
    """``fn(cancel)`` in a daemon thread, started at once; :meth:`outcome` waits for it and returns what it returned
    (or raises what it raised). ``cancel`` (a threading.Event) is set by :meth:`cancel`: ``fn`` passes it on to
    :meth:`LocalFederation.run`, which then stops."""

    def __init__(self, name: str, fn):
        super().__init__(daemon=True, name=name)
        self.fn, self.value, self.error = fn, None, None
        self.cancelled = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn(self.cancelled)
        except BaseException as e:  # noqa: BLE001 - handed to the test by outcome()
            self.error = e

    def outcome(self, timeout: float):
        self.join(timeout)
        if self.is_alive():
            raise RuntimeError(f"{self.name} did not finish within {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        return self.value

    def cancel(self, timeout: float = 60) -> None:
        self.cancelled.set()
        self.join(timeout)


@pytest.fixture(scope="module", autouse=True)
def _long_runs_start_first(request):
    """The module's two deployed runs take minutes, most of it waiting on Flower (a fresh ClientApp process per
    message, polling, a killed node declared lost): when their tests are selected, both start in the background
    with the module's first test and overlap its other tests; each of the two tests then waits for its run and
    checks what it recorded."""
    selected = {item.name for item in request.session.items}
    if KILLED_TEST in selected:
        request.getfixturevalue("killed_mid_round")
    if DP_FLOOR_TEST in selected:
        request.getfixturevalue("dp_floor_run")
    yield


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    fed = LocalFederation(tmp_path_factory.mktemp("deploy"), nodes=3, data=str(SST2), profile="cpu")
    try:
        fed.make_credentials(extra_keys=1)  # key 4 is never registered
        fed.start_superlink()
        fed.register([1, 2, 3])
        yield fed
    finally:
        fed.stop()
        left = fed.leftovers()  # below the SuperLink/SuperNodes too, even re-parented
        assert not left, f"processes left running: {left}"


@pytest.fixture(scope="module")
def dp_floor_run(fed):
    """The run of :func:`test_deployed_run_completes_while_a_node_with_a_dp_floor_refuses` on ``fed``, in the
    background: its SuperNodes (node 3 with its own privacy floor), then `flwr run`. The refusal tests below use
    the same SuperLink meanwhile (their SuperNodes never join the federation)."""
    out = fed.dir / "run"

    def run(cancel):
        fed.start_supernodes(extra={2: ("--dp-required", "--dp-max-epsilon", "3", "--dp-max-delta", "1e-5")})
        overrides = (f"strategy=ffa_lora model=tiny_llama num_clients=3 num_rounds=2 local_steps=1 "
                     f"train.batch_size=4 eval.max_examples=32 data.path={SST2} out_dir={out}")
        return fed.run(overrides, timeout=1800, cancel=cancel)

    bg = Background("dp-floor-run", run)
    yield out, bg
    bg.cancel()  # (done already unless its test did not wait for it); `fed` then stops every process


class KilledMidRound:
    """The federation and run of :func:`test_robust_4b_a_supernode_killed_mid_round_is_named_alone`, in the
    background: TLS + node auth, 3 SuperNodes, partition 2's node allows fault injection (it sleeps in training)
    and declares Flower's shortest heartbeat interval; a watcher SIGKILLs that SuperNode and its ClientApp 3 s
    after the ClientApp of round 1 appears."""

    def __init__(self, workdir: Path):
        self.fed = LocalFederation(workdir, nodes=3, data=str(SST2), profile="cpu")
        self.out = self.fed.dir / "run"
        self.killed: dict = {}
        self.bg = Background("killed-mid-round", self._scenario)

    def _scenario(self, cancel) -> tuple[int, dict, str]:
        f = self.fed
        f.make_credentials(extra_keys=0)
        f.start_superlink()
        f.register([1, 2, 3])
        pythonpath = os.pathsep.join(x for x in (str(FAST_HEARTBEAT), f.env.get("PYTHONPATH")) if x)
        f.start_supernodes(extra={2: ("--allow-faults",)}, env={2: {"PYTHONPATH": pythonpath}})
        killer = threading.Thread(target=self._kill_mid_round, daemon=True)
        killer.start()
        overrides = (f"strategy=fedit model=tiny_llama num_clients=3 num_rounds=2 local_steps=1 train.batch_size=4 "
                     f"eval.max_examples=16 debug.sleep_partitions=[2] debug.sleep_s=900 round_timeout=150 "
                     f"data.path={SST2} out_dir={self.out}")
        try:
            return f.run(overrides, timeout=900, cancel=cancel)
        finally:
            self.killed["stop"] = True
            killer.join(10)

    def _kill_mid_round(self) -> None:
        from fedlora import processes

        victim = self.fed.supernodes[2]
        t0 = time.time()
        while time.time() - t0 < 900 and not self.killed.get("stop"):
            started = (self.out / "metrics.jsonl").exists() and (self.out / "metrics.jsonl").read_text().strip()
            train_app = started and [p for p in processes.descendants([victim.pid])
                                     if any("flwr-clientapp" in a for a in _cmdline(p))]
            if train_app:  # round 1 was sent after round 0's line; the node's ClientApp holds its message
                time.sleep(3)
                for p in [*processes.descendants([victim.pid]), victim]:
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.killed["at"] = time.time()
                return
            time.sleep(0.5)

    def stop(self) -> list[int]:
        """Stop the run (if it still goes on) and every process of the federation; the PIDs still alive."""
        self.killed["stop"] = True
        self.bg.cancel()
        self.fed.stop()
        return self.fed.leftovers()


@pytest.fixture(scope="module")
def killed_mid_round(tmp_path_factory):
    k = KilledMidRound(tmp_path_factory.mktemp("killed") / "fed")
    try:
        yield k
    finally:
        left = k.stop()
        assert not left, f"processes left running: {left}"


def test_registering_a_known_key_again(fed):
    pub = str(key_paths(fed.keys, 1)[1])
    again = fed.fedlora("register", pub, "--connection", fed.connection, check=False)
    assert again.returncode == 1 and "already in use" in again.stderr  # no silent second identity
    skip = fed.fedlora("register", pub, "--connection", fed.connection, "--skip-registered")
    assert "already registered" in skip.stdout  # what the compose `register` service relies on


def test_unregistered_key_is_refused(fed):
    p = fed.spawn("supernode-unregistered", fed.supernode_args(0, key=4, extra=("--max-retries", "1")))
    rc = p.wait(timeout=180)
    log = fed.log(p)
    assert rc != 0, log
    assert "Failed to activate SuperNode" in log, log
    assert "SuperNode ID:" not in log  # it never got a node id
    assert "No SuperNode found with the given public key" in fed.log(fed.superlink)


def test_supernode_without_the_ca_cannot_connect(fed):
    # No CA at all: flower-supernode falls back to the system trust store, which does not know our CA.
    raw = [flwr_bin("flower-supernode"), "--superlink", fed.address, "--port", str(free_port()),
           "--auth-supernode-private-key", str(key_paths(fed.keys, 1)[0]), "--max-retries", "1"]
    # Another federation's CA (a wrong ca.crt) through the fedlora command.
    other = fed.dir / "other-ca"
    fed.fedlora("certs", str(other))
    wrong = fed.supernode_args(0, key=1, ca=False, extra=("--ca", str(other / "ca.crt"), "--max-retries", "1"))
    for name, args, is_raw in (("supernode-no-ca", raw, True), ("supernode-wrong-ca", wrong, False)):
        p = fed.spawn(name, args, raw=is_raw)
        rc = p.wait(timeout=180)
        log = fed.log(p)
        assert rc != 0, log
        assert "CERTIFICATE_VERIFY_FAILED" in log, log
        assert "SuperNode ID:" not in log


def test_deployed_run_completes_while_a_node_with_a_dp_floor_refuses(fed, dp_floor_run):
    """Issue 16's acceptance: the server's config asks for privacy=none while node 3's own floor requires DP:
    that node refuses every round with its reason (recorded in `rejected`), the others train, the run goes on.
    (The run itself is the fixture ``dp_floor_run``, started in the background with the module's first test.)"""
    out, bg = dp_floor_run
    run_id, info, log = bg.outcome(timeout=1800)
    for i, p in enumerate(fed.supernodes, start=1):  # each node authenticated as its registered key
        assert f"SuperNode ID: {fed.node_ids[i]}" in fed.log(p)
    assert info.get("status") == "finished:completed", (info, log[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["num_clients"] == 2 and r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["strategy"] == "ffa_lora"
        assert [x["node"] for x in r["rejected"]] == [2], r["rejected"]
        reason = r["rejected"][0]["reason"]
        assert reason.startswith("client status: refused") and "requires sample-level DP-SGD" in reason, reason
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    nodes = json.loads((out / "nodes.json").read_text())
    assert sorted(n["partition_id"] for n in nodes) == [0, 1, 2]
    assert {n["node_id"] for n in nodes} == set(fed.node_ids.values())
    for n in nodes:
        assert n["device"] == "cpu" and n["extra"]["profile"] == "cpu" and "device-memory" in n["extra"]


def test_robust_4b_a_supernode_killed_mid_round_is_named_alone(killed_mid_round):
    """Issue 20 item 4b, deployed: TLS + node auth, 3 SuperNodes; partition 2's node sleeps in its training
    (fault injection it allows) and is SIGKILLed, with its ClientApp, in the middle of round 1. Flower answers for
    it with "Node Unavailable" sent by the SuperLink (node id 1): each round's metrics name exactly that node, once,
    under its own node id and partition, with that reason -- not the healthy partition 1, and not a second time as
    "no reply within round_timeout". The run finishes with the two others.

    The federation and its run are :class:`KilledMidRound` (fixture ``killed_mid_round``), started in the
    background with the module's first test: this test waits for it and checks what it recorded."""
    k = killed_mid_round
    f, out, killed = k.fed, k.out, k.killed
    try:
        run_id, info, log = k.bg.outcome(timeout=1200)
        assert "at" in killed, f"the node was never killed mid-round:\n{log[-3000:]}"
        # the victim declared Flower's shortest heartbeat interval (tests/fast_heartbeat): lost after ~20 s, not ~60 s
        assert f"{HEARTBEAT_MARKER} 10 s (flwr.supernode.fleet_http_connection)" in f.log(f.supernodes[2])
        assert info.get("status") == "finished:completed", (info, log[-3000:])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2]
        victim_id = f.node_ids[3]  # key 3 is partition 2's node
        for r in rows[1:]:
            assert [(x["node"], x["node_id"]) for x in r["rejected"]] == [(2, victim_id)], r["rejected"]
            reason = r["rejected"][0]["reason"]
            assert reason.startswith("node lost (reported by the SuperLink): Error: Node Unavailable"), reason
            assert r["num_clients"] == 2
        assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    finally:
        left = k.stop()
        assert not left, f"processes left running: {left}"


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []
