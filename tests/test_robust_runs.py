"""Runs that end without training, lost nodes, colliding run directories (issue 20 items 4, 4b, 5).

- 4: a run whose rounds were all skipped ends ``no-round-aggregated``, one with fewer than
  ``min_aggregated_share`` of its rounds aggregated ``degraded``: ``summary.json`` says why (the last round's
  rejected clients), ``fedlora run`` exits 3, ``flwr run .``'s ServerApp fails, a comparison leaves the run out
  of its means and names it.
- 4b: every reply is matched to the message it answers (its reply-to id), so a node lost mid-run is recorded
  once per round under its own node id and partition with the SuperLink's reason, never under the SuperLink's
  node id 1 (a healthy partition) nor a second time as "no reply within round_timeout". The deployed version
  (a SuperNode SIGKILLed mid-round) is in tests/test_deploy.py.
- 5: two starts into one run directory at the same moment: one wins, the other gets one sentence; default names
  in the same second are distinct; the ServerApp checks too; a crashed run's directory can be resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT
from harness import FlowerGrid, InProcessGrid

from fedlora import config, report, rundir
from fedlora.config import ConfigError

FAST = ["model=tiny_llama", "local_steps=1", "train.batch_size=4", "eval.max_examples=16", "train.max_length=32",
        "data.max_train_examples=120"]
QUIET = {"echo": lambda *a, **k: None}


def rows_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fails_from(first_round: int):
    """A fault (:class:`harness.InProcessGrid`) that raises in train rounds >= ``first_round``."""
    def fault(msg, ctx, fn):
        if int(msg.content["config"]["server-round"]) >= first_round:
            raise RuntimeError(f"injected failure in round {msg.content['config']['server-round']}")
        return fn(msg, ctx)
    return fault


# ------------------------------------------------------------------------------------------------
# 4: no round aggregated / degraded
# ------------------------------------------------------------------------------------------------
def test_robust_4_no_round_aggregated_is_a_failed_status_with_the_last_rounds_rejected(tmp_path):
    from fedlora.strategies.server_app import run_server

    cfg = config.load(FAST + ["num_clients=3", "num_rounds=2", "debug.raise_partitions=[0,1,2]"])
    summary = run_server(InProcessGrid(3), cfg, tmp_path / "run", **QUIET)
    assert summary["status"] == "no-round-aggregated" and summary["rounds_aggregated"] == 0
    assert rundir.STATUSES[summary["status"]] == 3
    reason = summary["status_reason"]
    assert reason.startswith("0 of 2 rounds aggregated (min_aggregated_share=0.5); last round 2 skipped (only 0 "
                             "valid updates"), reason
    assert [x["node"] for x in summary["last_rejected"]] == [0, 1, 2]
    assert all("injected failure on client" in x["reason"] for x in summary["last_rejected"])
    for pid in (0, 1, 2):
        assert f"partition {pid} (node " in reason
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "no-round-aggregated"


@pytest.mark.parametrize("share, status", [(0.5, "degraded"), (0.3, "completed")])
def test_robust_4_fewer_rounds_aggregated_than_the_share_is_degraded(tmp_path, share, status):
    """Partition 1 fails from round 2 on, so with min_train_nodes=2 only round 1 of 3 aggregates: 1/3 < 0.5."""
    from fedlora.strategies.server_app import run_server

    cfg = config.load(FAST + ["num_clients=2", "num_rounds=3", f"min_aggregated_share={share}"])
    summary = run_server(InProcessGrid(2, faults={1: fails_from(2)}), cfg, tmp_path / "run", **QUIET)
    assert (summary["status"], summary["rounds_aggregated"]) == (status, 1)
    if status == "degraded":
        assert summary["status_reason"].startswith("1 of 3 rounds aggregated (min_aggregated_share=0.5); last round 3")
        assert [x["node"] for x in summary["last_rejected"]] == [1]
        assert "injected failure in round 3" in summary["last_rejected"][0]["reason"]
    else:
        assert summary["status_reason"] is None


def test_robust_4_run_status_rules():
    ok, skip = {"round": 1}, {"round": 1, "skipped": "only 1 valid updates", "rejected": [{"node": 0}]}
    assert rundir.run_status([{"round": 0}], 0.5)["status"] == "completed"  # nothing ran (stopped before round 1)
    assert rundir.run_status([{"round": 0}, ok, ok], 1.0)["status"] == "completed"
    assert rundir.run_status([{"round": 0}, ok, skip], 0.5)["status"] == "completed"  # 1/2 is not below 0.5
    assert rundir.run_status([{"round": 0}, ok, skip, skip], 0.5)["status"] == "degraded"
    assert rundir.run_status([{"round": 0}, skip], 0.0)["status"] == "no-round-aggregated"  # whatever the share
    assert rundir.run_status([{"round": 0}, ok], 0.5, stopped="budget")["status"] == "budget-exhausted"
    assert rundir.run_status([{"round": 0}, skip], 0.5, stopped="budget")["status"] == "no-round-aggregated"
    assert rundir.run_status([{"round": 0}, ok, skip], 0.5)["last_rejected"] == [{"node": 0}]
    from omegaconf import OmegaConf

    assert rundir.min_aggregated_share(OmegaConf.create({})) == 0.5  # a saved config from before the key
    for bad in (-0.1, 1.5, "half", True):  # (the ServerApp's own check; the pre-flight's is in fedlora.config)
        with pytest.raises(ConfigError, match="min_aggregated_share=.* must be a number in \\[0, 1\\]"):
            rundir.min_aggregated_share(OmegaConf.create({"min_aggregated_share": bad}))


def test_robust_4_fedlora_run_exits_3_and_the_server_app_fails(tmp_path, monkeypatch, capsys):
    """`fedlora run` (its simulation replaced by the in-process grid: the same ServerApp loop) exits 3 with the
    reason; `flwr run .`'s ServerApp raises after writing the run, so Flower records the run as failed."""
    from flwr.app import Context, RecordDict

    from fedlora import cli, simulation
    from fedlora.strategies import server_app

    def in_process(cfg, run_dir, verbose=False, resume=False):
        return server_app.run_server(InProcessGrid(int(cfg.num_clients)), cfg, run_dir, resume=resume, **QUIET)

    monkeypatch.setattr(simulation, "simulate", in_process)
    monkeypatch.setattr(simulation, "quiet_libraries", lambda verbose: None)  # no process-wide logging changes
    bad = FAST + ["num_clients=2", "num_rounds=1", "debug.raise_partitions=[0,1]"]
    assert cli.main(["run", *bad, f"out_dir={tmp_path / 'a'}"]) == 3
    err = capsys.readouterr().err
    assert "error: the run ended no-round-aggregated: 0 of 1 rounds aggregated" in err and str(tmp_path / "a") in err
    assert cli.main(["run", *FAST, "num_clients=2", "num_rounds=1", f"out_dir={tmp_path / 'b'}"]) == 0

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"hydra-overrides": " ".join(bad), "run-dir": str(tmp_path / "c")})
    with pytest.raises(RuntimeError, match="run no-round-aggregated: 0 of 1 rounds aggregated"):
        server_app.main(InProcessGrid(2), ctx)
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["status"] == "no-round-aggregated"


def _fake_run(d, finals, status="completed", aggregated=2):
    d.mkdir(parents=True)
    rows = [{"round": i, "eval_accuracy": a, "bytes_up": 10, "bytes_down": 20} for i, a in enumerate(finals)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({
        "final_eval_accuracy": finals[-1], "best_eval_accuracy": max(finals), "bytes_up": 20, "bytes_down": 40,
        "wall_s": 5.0, "rounds": len(finals) - 1, "rounds_aggregated": aggregated, "status": status}))
    return d


def test_robust_4_comparison_marks_a_failed_run_and_leaves_it_out_of_the_means(tmp_path):
    """fedit seed 1 aggregated no round: its row keeps its figures and says so; fedit's mean, sd, verdict
    and plots come from seeds 0 and 2 only; the strategy's note names the failed seed."""
    finals = {("fedit", 0): 0.80, ("fedit", 1): 0.50, ("fedit", 2): 0.84,
              ("flora", 0): 0.85, ("flora", 1): 0.86, ("flora", 2): 0.90}
    seed_rows = []
    for (name, seed), f in finals.items():
        failed = (name, seed) == ("fedit", 1)
        d = _fake_run(tmp_path / f"seed_{seed}" / name, [0.5, f], "no-round-aggregated" if failed else "completed",
                      0 if failed else 1)
        seed_rows.append(report.summarise(name, d, 0.83) | {"seed": seed, "run_dir": f"seed_{seed}/{name}"})
    bad = next(r for r in seed_rows if r["strategy"] == "fedit" and r["seed"] == 1)
    assert bad["status"] == "no-round-aggregated" and report.failed(bad) and bad["final_accuracy"] == 0.5
    assert bad["note"] == "no-round-aggregated: 0 of 1 rounds aggregated, left out of the means"
    assert all(r["status"] == "completed" and r["note"] == "" for r in seed_rows if r is not bad)
    rows = {r["strategy"]: r for r in report.aggregate(seed_rows, "fedit")}
    fedit, flora = rows["fedit"], rows["flora"]
    assert fedit["seeds"] == 2 and fedit["final_accuracy"] == pytest.approx(0.82)
    assert fedit["note"] == "no-round-aggregated: 0 of 1 rounds aggregated, left out of the means (seed 1)"
    assert flora["seeds"] == 3 and flora["diff_final"] == pytest.approx(0.055)  # paired on seeds 0 and 2 only
    table = report.write_comparison(tmp_path, seed_rows, 0.83, "setting.", "fedit")
    assert "left out of the means (seed 1)" in table
    csv_rows = (tmp_path / "comparison_seeds.csv").read_text().splitlines()
    assert csv_rows[0].split(",")[-2:] == ["status", "note"] and "no-round-aggregated" in csv_rows[2]
    # every seed failed: no figures, the note says why
    only = report.aggregate([bad], None)[0]
    assert only["seeds"] == 0 and only["final_accuracy"] is None and "no-round-aggregated" in only["note"]


# ------------------------------------------------------------------------------------------------
# 4b: replies matched to the messages they answer
# ------------------------------------------------------------------------------------------------
def test_robust_4b_replies_are_matched_to_their_messages():
    """Constructed Messages, no network: the SuperLink's error reply for a lost node (sender 1), a reply sent in
    another node's name, a second reply, and a reply to no message of the round."""
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from fedlora.strategies.base import NodeInfo
    from fedlora.strategies.replies import attribute

    ids = {0: 2001, 1: 2002, 2: 2003, 3: 2004}  # partition -> node id (Flower never gives a SuperNode the id 1)
    nodes = {nid: NodeInfo(nid, pid, 10, 4, 8.0) for pid, nid in ids.items()}
    sent = []
    for pid, nid in ids.items():
        m = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.TRAIN, dst_node_id=nid)
        m.metadata.__dict__["_message_id"] = f"msg-{pid}"
        sent.append(m)

    def reply(to, src=None):
        r = Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=to)
        if src is not None:
            r.metadata.__dict__["_src_node_id"] = src
        return r

    lost = create_message_error_unavailable_res_message(sent[2].metadata, "node_unavail")
    assert lost.metadata.src_node_id == 1 and lost.metadata.reply_to_message_id == "msg-2"  # Flower's own reply
    impostor = reply(sent[3], src=ids[0])  # node of partition 0 answers partition 3's message
    stray = Message(RecordDict({}), reply_to=Message(RecordDict({}), message_type=MessageType.TRAIN,
                                                     dst_node_id=ids[1]))
    stray.metadata.__dict__["_reply_to_message_id"] = "not-sent"
    good0, good1 = reply(sent[0]), reply(sent[1])
    att = attribute([good0, lost, impostor, good1, reply(sent[0]), stray], sent, nodes)
    assert att.replies == [good0, good1]  # the second reply to msg-0 and the stray one are dropped
    assert att.answered == {ids[0], ids[1], ids[2], ids[3]}
    assert [(r["node"], r["node_id"]) for r in att.rejected] == [(2, ids[2]), (3, ids[3])]
    assert att.rejected[0]["reason"].startswith("node lost (reported by the SuperLink): Error: Node Unavailable")
    assert att.rejected[1]["reason"] == f"the reply to this node's message came from node {ids[0]}"
    # without message ids (grids that set none) each reply speaks for its sender, as before
    plain = attribute([good0, good1], None, nodes)
    assert plain.replies == [good0, good1] and plain.answered == {ids[0], ids[1]} and not plain.rejected


def test_robust_4b_a_lost_node_is_recorded_once_under_its_own_id(tmp_path):
    """Partition 2's node is lost from round 2 on (the SuperLink answers for it, sender node id 1): rounds 2 and 3
    name it, and only it, once, with the SuperLink's reason; the healthy partitions (1 among them) are counted and
    never blamed; nothing is "no reply within round_timeout"; a node that does not answer at all still is."""
    from fedlora.strategies.server_app import run_server

    cfg = config.load(FAST + ["num_clients=4", "num_rounds=3"])
    grid = FlowerGrid(4, lost={2: 2})
    summary = run_server(grid, cfg, tmp_path / "run", **QUIET)
    assert summary["status"] == "completed"
    lost_id = next(nid for nid in grid.contexts if grid.partition_of(nid) == 2)
    rows = rows_of(tmp_path / "run")
    assert rows[1]["rejected"] == [] and rows[1]["num_clients"] == 4
    for r in rows[2:]:
        assert r["num_clients"] == 3
        assert [(x["node"], x["node_id"]) for x in r["rejected"]] == [(2, lost_id)], r["rejected"]
        assert r["rejected"][0]["reason"].startswith("node lost (reported by the SuperLink): Error: Node Unavailable")

    silent = FlowerGrid(3, faults={1: lambda msg, ctx, fn: None})  # partition 1 never answers, nobody for it
    run_server(silent, config.load(FAST + ["num_clients=3", "num_rounds=1"]), tmp_path / "silent", **QUIET)
    (r1,) = rows_of(tmp_path / "silent")[1:]
    assert [(x["node"], x["reason"]) for x in r1["rejected"]] == [(1, "no reply within round_timeout=600s")]


# ------------------------------------------------------------------------------------------------
# 5: run directories are claimed exclusively
# ------------------------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time, json
    sys.path.insert(0, {root!r})
    from types import SimpleNamespace
    from fedlora import rundir
    from fedlora.config import ConfigError
    start, what, target, hold = float(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    while time.time() < start:
        time.sleep(0.001)
    try:
        if what == "default":
            d = rundir.default_run_dir(SimpleNamespace(strategy=SimpleNamespace(name="fedit")), root=target,
                                       stamp="20260101-120000")
            rundir.check_fresh(d)
        else:
            d = rundir.check_fresh(target) or target
        print(json.dumps({{"ok": str(d)}}), flush=True)
        time.sleep(hold)
    except ConfigError as e:
        print(json.dumps({{"refused": str(e)}}), flush=True)
""").format(root=str(ROOT))


def start_at(t0: float, what: str, target, hold: float = 4.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(t0), what, str(target), str(hold)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def results(procs) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_robust_5_two_concurrent_starts_into_one_out_dir(tmp_path):
    """Two processes claim the same out_dir at the same instant: one wins, the other is refused in one sentence
    naming the winner's pid; neither wrote anything of a run."""
    target = tmp_path / "run"
    t0 = time.time() + 1.5  # both interpreters are up by then
    procs = [start_at(t0, "out_dir", target) for _ in range(2)]
    got = results(procs)
    ok = [g for g in got if "ok" in g]
    refused = [g["refused"] for g in got if "refused" in g]
    assert len(ok) == 1 and len(refused) == 1, got
    winner = procs[[i for i, g in enumerate(got) if "ok" in g][0]].pid
    assert refused[0].startswith(f"out_dir {target} is in use by another run (pid {winner} on "), refused[0]
    assert refused[0].endswith("choose another out_dir, or wait for that run to end.")
    assert not rundir.lock_path(target).exists() and not target.exists()  # released; claiming creates no dir


def test_robust_5_default_names_in_the_same_second_are_distinct(tmp_path):
    cfg = SimpleNamespace(strategy=SimpleNamespace(name="fedit"))
    a = rundir.default_run_dir(cfg, root=tmp_path / "seq", stamp="20260101-120000")
    b = rundir.default_run_dir(cfg, root=tmp_path / "seq", stamp="20260101-120000")
    assert (a.name, b.name) == ("20260101-120000-fedit", "20260101-120000-fedit-2") and a.is_dir() and b.is_dir()
    t0 = time.time() + 1.5
    got = results([start_at(t0, "default", tmp_path / "par", hold=0.5) for _ in range(3)])
    dirs = sorted(g["ok"] for g in got)
    assert len(set(dirs)) == 3, got
    assert [os.path.basename(d) for d in dirs] == ["20260101-120000-fedit", "20260101-120000-fedit-2",
                                                   "20260101-120000-fedit-3"]


def test_robust_5_preflight_and_server_app_refuse_a_dir_in_use_and_a_crashed_run_resumes(tmp_path):
    """Another process holds out_dir: `fedlora run`'s pre-flight and the ServerApp itself (what `flwr run .` and
    a run started elsewhere go through) refuse it before writing anything. When the holder dies (SIGKILL), the OS
    releases its lock: the stale run.lock does not block, and a crashed run can be resumed."""
    from fedlora import preflight
    from fedlora.strategies.server_app import run_server
    from harness import KillingGrid, Killed

    target = tmp_path / "run"
    holder = start_at(time.time(), "out_dir", target, hold=120)
    try:
        assert "ok" in json.loads(holder.stdout.readline())
        with pytest.raises(ConfigError, match=f"out_dir {target} is in use by another run \\(pid {holder.pid} "):
            preflight.prepare(FAST + ["num_clients=2", "num_rounds=1", f"out_dir={target}"])
        cfg = config.load(FAST + ["num_clients=2", "num_rounds=2"])
        with pytest.raises(ConfigError, match="is in use by another run"):
            run_server(InProcessGrid(2), cfg, target, **QUIET)
        assert not target.exists()  # nothing of a run written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)
    assert rundir.lock_path(target).exists()  # left behind by the killed process, locked by nobody
    with pytest.raises(Killed):  # this run dies in round 2, after round 1's checkpoint
        run_server(KillingGrid(2, kill_round=2), cfg, target, **QUIET)
    assert not rundir.lock_path(target).exists()  # released on the way out
    with pytest.raises(ConfigError, match="already holds a run: pass resume="):
        preflight.prepare(FAST + ["num_clients=2", "num_rounds=2", f"out_dir={target}"])
    cfg2, rdir, resume = preflight.prepare([f"resume={target}"])
    assert resume and rdir == target.resolve()
    summary = run_server(InProcessGrid(2), cfg2, rdir, resume=True, **QUIET)
    assert summary["status"] == "completed" and [r["round"] for r in rows_of(target)] == [0, 1, 2]
    assert not rundir.lock_path(target).exists()


def test_robust_6_run_directory_never_comes_from_the_environment(tmp_path, monkeypatch):
    """Item 6: a run directory set by an earlier run (once the variable FEDLORA_RUN_DIR) never wins over the next
    run's: two ServerApps in one process, each given its own directory, write there and nowhere else, with a stale
    FEDLORA_RUN_DIR in the environment; nothing reads it any more."""
    from flwr.app import Context, RecordDict

    from fedlora.strategies import server_app

    stale = tmp_path / "stale"
    monkeypatch.setenv("FEDLORA_RUN_DIR", str(stale))
    for name in ("first", "second"):
        ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"hydra-overrides": " ".join(FAST + ["num_clients=2", "num_rounds=1"]),
                                  "run-dir": str(tmp_path / name)})
        server_app.main(InProcessGrid(2), ctx)
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "completed"
        assert len(rows_of(tmp_path / name)) == 2  # its own round 0 and round 1, nothing appended from another run
    assert not stale.exists()
    sources = [p for d in ("fedlora", "strategies", "clients") for p in (ROOT / d).rglob("*.py")]
    assert not [p for p in sources if "FEDLORA_RUN_DIR" in p.read_text()]
