"""server.compile: FedIT's and FFA-LoRA's sum of 16-bit and int8 replies compiled by torch.compile
(fedlora/compiled.py) is the eager sum within float32 rounding, touches nothing else, and is refused before the
run where it cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import assert_within, f32_tol

from fedlora import algebra, compiled, config, payloads, preflight
from fedlora.adapters import AdapterState, LoraFactors


def states_of(dtype, K=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"l0.q": (24, 40), "l1.v": (33, 17)}
    return [AdapterState({n: LoraFactors((torch.randn(4, i, generator=g) / 4).to(dtype),
                                         (torch.randn(o, 4, generator=g) / 10).to(dtype), 2.0)
                          for n, (o, i) in shapes.items()},
                         {"head.weight": torch.randn(2, 17, generator=g).to(dtype)}) for _ in range(K)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_compiled_sum_of_16bit_replies_is_the_eager_sum_within_float32_rounding(monkeypatch, dtype):
    """Groups of GROUP clients (3 here, so 7 clients make groups of 3, 3 and 1: two compiled loop lengths), any
    shape, the head too: sum_k p_k t_k of the widened values within float32 rounding (tolerances.py), in float32."""
    monkeypatch.setattr(compiled, "GROUP", 3)
    calls, wsum = [], compiled.wsum
    monkeypatch.setattr(compiled, "wsum", lambda col, p: calls.append(col[0].shape) or wsum(col, p))
    states, w = states_of(dtype), [5, 1, 3, 8, 2, 7, 4]
    p = algebra.normalize(w)
    for fn in (algebra.fedit, algebra.ffa_average) if dtype == torch.float16 else (algebra.fedit,):
        if fn is algebra.ffa_average:
            for st in states[1:]:
                for n, f in st.lora.items():
                    f.A = states[0].lora[n].A
        calls.clear()
        got, eager = fn(states, w, compiled=True), fn(states, w)
        assert len(calls) == (5 if fn is algebra.fedit else 3)  # every 16-bit column took the compiled sum
        for n, f in got.lora.items():
            for part in ("A", "B") if fn is algebra.fedit else ("B",):  # (FFA-LoRA keeps the shared A as it is)
                a, b = getattr(f, part), getattr(eager.lora[n], part)
                terms = [getattr(st.lora[n], part).double() for st in states]
                assert a.dtype == torch.float32 and a.shape == b.shape
                # (both sides use the same float32 weights: a term's product, then K additions: K + 1)
                assert_within(a, b, f32_tol(len(states) + 1, sum(pk * t.abs() for pk, t in zip(p, terms))),
                              f"{n}.{part}")
        assert_within(got.extra["head.weight"], eager.extra["head.weight"],
                      f32_tol(len(states) + 1, sum(pk * st.extra["head.weight"].double().abs()
                                               for pk, st in zip(p, states))))


@pytest.mark.parametrize("chunk", [1 << 20, 512])
def test_the_compiled_sum_of_int8_replies_is_the_eager_sum_within_float32_rounding(monkeypatch, chunk):
    """int8 replies as sent (codes in blocks of 64, the last one padded: 96 and 160 values; every tensor's codes and
    block scales views of its message's #codes and #absmax), in groups of 3, 3 and 1 clients, every column summed
    from the messages (compiled.message_sums): in one run of adjacent tensors, or in runs of at most two blocks
    (CHUNK_BYTES 512), which splits a tensor from its neighbours. Either way the eager sum of the decoded values
    within float32 rounding."""
    from fedlora import codecs
    from fedlora.adapters import from_arrays, to_arrays

    monkeypatch.setattr(compiled, "GROUP", 3)
    monkeypatch.setattr(compiled, "CHUNK_BYTES", chunk)
    calls, wsum, message_sums = [], compiled.wsum, compiled.message_sums
    monkeypatch.setattr(compiled, "wsum", lambda col, p: calls.append(col[0].shape) or wsum(col, p))
    monkeypatch.setattr(compiled, "message_sums",
                        lambda cols, p: (lambda d: calls.extend(["whole"] * len(d)) or d)(message_sums(cols, p)))
    c = codecs.Codec("int8")
    states = [from_arrays(codecs.decode(c, codecs.encode(c, to_arrays(st)), wide=False), 2.0)
              for st in states_of(torch.float32)]
    assert isinstance(states[0].lora["l0.q"].A, codecs.Int8Blocks)
    w = [5, 1, 3, 8, 2, 7, 4]
    p = algebra.normalize(w)
    got, eager = algebra.fedit(states, w, compiled=True), algebra.fedit(states, w)
    assert calls == ["whole"] * 5  # the four factors, then the head, from the messages
    for n, f in got.lora.items():
        for part in "AB":
            a, terms = getattr(f, part), [getattr(st.lora[n], part).double() for st in states]
            assert a.dtype == torch.float32 and a.shape == terms[0].shape
            # (the weights differ: p / 127 in float32 here, in float64 then cast eagerly; a term's code x absmax
            # and x weight, then K additions: K + 4, as test_codecs' int8 bound)
            assert_within(a, getattr(eager.lora[n], part), f32_tol(len(states) + 4, sum(pk * t.abs() for pk, t in
                                                                                    zip(p, terms))), f"{n}.{part}")
    assert_within(got.extra["head.weight"], eager.extra["head.weight"], f32_tol(len(states) + 4, sum(
        pk * st.extra["head.weight"].double().abs() for pk, st in zip(p, states))))


def test_messages_of_other_layouts_are_summed_a_column_at_a_time(monkeypatch):
    """The whole-message sum only where every client's message places each tensor at the same blocks: a client
    whose message also holds another tensor (its blocks shifted) sends the sum back to the columns; the result is
    the eager sum within float32 rounding either way."""
    from fedlora import codecs
    from fedlora.adapters import from_arrays, to_arrays

    c = codecs.Codec("int8")
    arrays = [to_arrays(st) for st in states_of(torch.float32, K=4)]
    arrays[2].update({"a.lora_A": np.ones((4, 64), np.float32), "a.lora_B": np.ones((64, 4), np.float32)})  # (first)
    states = [from_arrays(codecs.decode(c, codecs.encode(c, a), wide=False), 2.0) for a in arrays]
    cols = [[st.lora["l0.q"].A for st in states], [st.lora["l1.v"].B for st in states]]
    assert compiled.message_sums(cols, [0.25] * 4) == {}
    same = [[st.lora[n].A for st in states[:2]] for n in ("l0.q", "l1.v")] + \
        [[st.lora[n].B for st in states[:2]] for n in ("l0.q", "l1.v")]
    sums = compiled.message_sums(same, [0.5, 0.5])
    assert sorted(sums) == [0, 1, 2, 3]
    for j, col in enumerate(same):
        exact = sum(0.5 * t.float().double() for t in col)
        assert_within(sums[j], exact, f32_tol(2 + 4, sum(0.5 * t.float().double().abs() for t in col)))
    states[2].lora.pop("a")  # FedIT over the four (the third's blocks still shifted): every column by wsum
    calls, wsum = [], compiled.wsum
    monkeypatch.setattr(compiled, "wsum", lambda col, p: calls.append(1) or wsum(col, p))
    got, eager = algebra.fedit(states, [1, 2, 3, 4], compiled=True), algebra.fedit(states, [1, 2, 3, 4])
    assert len(calls) == 5  # four factors and the head
    for n, f in got.lora.items():
        for part in "AB":
            terms = [getattr(st.lora[n], part).double() for st in states]
            assert_within(getattr(f, part), getattr(eager.lora[n], part),
                          f32_tol(4 + 4, sum(t.abs() for t in terms)), f"{n}.{part}")


def test_fp32_replies_keep_the_eager_sum_bit_for_bit(monkeypatch):
    monkeypatch.setattr(compiled, "wsum", None)  # never called
    states = states_of(torch.float32)
    got, eager = algebra.fedit(states, [1] * 7, compiled=True), algebra.fedit(states, [1] * 7)
    assert all(torch.equal(f.A, eager.lora[n].A) and torch.equal(f.B, eager.lora[n].B) for n, f in got.lora.items())


def test_refused_before_the_run_for_a_strategy_that_does_not_sum_or_without_a_compiler(monkeypatch):
    cfg = config.load(["strategy=flora", "server.compile=true"])
    with pytest.raises(config.ConfigError, match=r"server.compile=true applies to the strategies that sum "
                                                 r"replies as sent \(fedit and ffa_lora\), not to strategy=flora"):
        preflight.check_compile(cfg)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(config.ConfigError, match="needs a C.. compiler for torch.compile on the CPU, and none of g.., "
                                                 "c.., clang.. is on PATH: install one"):
        preflight.check_compile(config.load(["strategy=fedit", "server.compile=true"]))
    preflight.check_compile(config.load(["strategy=fedit"]))  # off: nothing to check
    with pytest.raises(config.ConfigError, match="server.compile=yes must be true or false"):
        config.validate(config.load(["server.compile=yes"]))


@pytest.mark.parametrize("name,up", [("fedit", "fp16"), ("ffa_lora", "fp16"), ("fedit", "int8")])
def test_a_server_with_compile_aggregates_coded_replies_as_the_eager_one(monkeypatch, name, up):
    """Through the strategy: server.compile=true and comm.up=fp16 or int8, one round of four replies; the compiled
    sum ran, and the served adapter is the eager server's within float32 rounding of a four-term sum (of values < 1)."""
    import numpy as np
    from test_fuzz import make_strategy, message, snapshot, valid_reply

    from fedlora import codecs

    calls, wsum, message_sums = [], compiled.wsum, compiled.message_sums
    monkeypatch.setattr(compiled, "wsum", lambda col, p: calls.append(1) or wsum(col, p))
    monkeypatch.setattr(compiled, "message_sums", lambda cols, p: (lambda d: calls.extend([1] * len(d)) or d)(
        message_sums(cols, p)))  # (int8: the messages summed)
    rng = np.random.default_rng(5)
    ranks = [4, 4, 4, 4]
    on, off = (make_strategy(name, ranks, [f"comm.up={up}", *o]) for o in (["server.compile=true"], []))
    assert on.compiled and not off.compiled
    replies = [message(n, codecs.encode(on.codec_up, valid_reply(on, n, rng)[0]), valid_reply(on, n, rng)[1])
               for n in sorted(on.nodes.values(), key=lambda n: n.partition_id)]
    a, b = on.aggregate_round(1, replies), off.aggregate_round(1, replies)
    assert not a.rejected and not b.rejected and calls
    for k, x in snapshot(on).items():
        assert_within(x, snapshot(off)[k], f32_tol(4 + 4, 1.0), k)  # (int8's four roundings a term, as above)


def test_a_two_round_run_with_compile_ends_where_the_eager_run_ends(tmp_path):
    """The ServerApp's loop (in-process grid, tiny_llama, 3 clients, bf16 uplink, diagnostics off too): both runs
    aggregate every client in both rounds, and the served adapters agree within float32 rounding carried through
    one more local step (1e-4 relative here; the same start gives the same training)."""
    from safetensors.torch import load_file
    from test_codecs import _run

    finals = []
    for label, extra in (("eager", []), ("compiled", ["server.compile=true", "diagnostics=false"])):
        d, rows = _run(tmp_path, label, ["comm.up=bf16", *extra])
        assert [r["num_clients"] for r in rows[1:]] == [3, 3] and not any(r.get("rejected") for r in rows[1:])
        assert ("cross_term_error" in rows[-1]) == (label == "eager")
        finals.append(load_file(next(d.rglob("adapter_model.safetensors"))))
    assert finals[0].keys() == finals[1].keys()
    for k, a in finals[0].items():
        assert float((a - finals[1][k]).abs().max()) <= 1e-4 * max(float(a.abs().max()), 1e-6), k


def test_the_compiled_int8_quantiser_is_bitsandbytes_bit_for_bit():
    """fedlora.compiled.int8_quantise against bitsandbytes' int8_vectorwise_quant (the codec's quantiser): the same
    codes and scales on blocks over 60 orders of magnitude, exact ties, an all-zero block (codes 0 where
    bitsandbytes divides 0 by 0) and a padded last block; codecs.encode with compiled=True sends the same arrays."""
    import bitsandbytes.functional as F
    import numpy as np

    from fedlora import codecs

    g = torch.Generator().manual_seed(7)
    rows = torch.randn(20000, 64, generator=g) * torch.exp(torch.randn(20000, 1, generator=g) * 8)
    rows[3] = 0
    rows[5] = torch.tensor([127.0, 0.5, -0.5, 1.5, -2.5, 63.5] + [0.25] * 58)  # x * 127 / 127: ties at .5
    q, absmax = torch.full((20000, 64), 99, dtype=torch.int8), torch.full((20000,), -1.0)  # (written over)
    compiled.int8_quantise(rows, q, absmax)
    qb, ab, _ = F.int8_vectorwise_quant(rows)
    qb[ab == 0] = 0
    assert torch.equal(absmax, ab) and torch.equal(q, qb) and not q[3].any()
    arrays = {"m.lora_A": np.asarray(torch.randn(4, 24, generator=g)), "m.lora_B": np.zeros((40, 4), np.float32),
              "extra.head.weight": np.asarray(torch.randn(2, 17, generator=g))}  # 96, 160 and 34 values: padded
    c = codecs.Codec("int8")
    a, b = codecs.encode(c, arrays, compiled=True), codecs.encode(c, arrays)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    from test_fuzz import make_strategy  # through the strategy's downlink: the same payload, the same errors

    on, off = (make_strategy("fedit", [4] * 4, ["comm.down=int8", *o]) for o in (["server.compile=true"], []))
    node = next(iter(on.nodes.values()))
    a, b = (s.encode_payload(s.payload(node, 1)[0], payloads.Payloads()) for s in (on, off))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) and on.down_errors == off.down_errors


def test_a_run_says_when_server_compile_has_nothing_to_compile():
    """server.compile=true with an fp32 (or nf4, top-k) uplink and no int8 downlink: one sentence in the run's log
    and summary warnings, naming the codecs and the fix; none when a codec it compiles is set, or when it is off."""
    from fedlora.strategies.server_app import config_warnings

    note = preflight.compile_note(config.load(["strategy=fedit", "server.compile=true"]))
    assert note == ("server.compile=true compiles nothing with comm.up=fp32 and comm.down=fp32: it compiles the sum "
                    "of fp16, bf16 and int8 replies and an int8 downlink's quantiser; set comm.up=bf16 (or fp16, "
                    "int8) or server.compile=false.")
    assert note in config_warnings(config.load(["strategy=fedit", "server.compile=true"]))
    assert "comm.up=nf4" in preflight.compile_note(config.load(["server.compile=true", "comm.up=nf4"]))
    for on in (["comm.up=bf16"], ["comm.up=int8"], ["comm.down=int8"]):
        assert preflight.compile_note(config.load(["strategy=ffa_lora", "server.compile=true", *on])) is None
    assert preflight.compile_note(config.load(["strategy=fedit"])) is None
