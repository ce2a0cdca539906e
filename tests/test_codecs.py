"""Message codecs (issue 18, ``comm.up``/``comm.down``, :mod:`fedlora.codecs`): every codec's round trip within its
stated bound and its bytes; error feedback keeps the sum of what is sent within one residual of the sum of the true
tensors; malformed encoded replies are refused with a reason and change nothing (fuzz, ≥1,000 cases); runs with a
codec each way count the encoded bytes, record the codec's error in the metrics and the audit, leave fp32 exactly
as before, and under DP-SGD leave epsilon untouched; config errors are one sentence."""

import copy
import json
import math
import random

import numpy as np
import pytest
import torch
from test_fuzz import make_strategy, message, snapshot, valid_reply
from tolerances import assert_within, f32_tol, gamma

from fedlora import codecs, config, diagnostics, payloads, validate
from fedlora.adapters import to_arrays
from fedlora.codecs import Codec, CodecError

RNG = np.random.default_rng(0)
ARRAYS = {"layers.0.q.lora_A": RNG.standard_normal((8, 384)).astype(np.float32),
          "layers.0.q.lora_B": (RNG.standard_normal((384, 8)) * 0.01).astype(np.float32),
          "extra.head.weight": RNG.standard_normal((2, 385)).astype(np.float32),
          "merge.1.layers.0.q": RNG.standard_normal((3, 4)).astype(np.float32)}  # not an adapter tensor: as is


def _blocks(x: np.ndarray, b: int) -> np.ndarray:
    """Each element's block absmax (blocks of ``b`` over the flattened tensor)."""
    flat = x.reshape(-1)
    pad = np.concatenate([np.abs(flat), np.zeros((-len(flat)) % b, np.float32)]).reshape(-1, b).max(1)
    return np.repeat(pad, b)[: len(flat)].reshape(x.shape)


def _max_gap(code: torch.Tensor) -> float:
    return float(code.sort().values.diff().max())


@pytest.mark.parametrize("name", codecs.CODECS)
def test_round_trip_within_the_stated_bound_and_bytes(name):
    import bitsandbytes.functional as F

    c = Codec(name, topk_fraction=0.1)
    enc = codecs.encode(c, ARRAYS)
    dec = codecs.decode(c, enc)
    assert set(dec) == set(ARRAYS) and all(dec[k].dtype == np.float32 and dec[k].shape == v.shape
                                           for k, v in ARRAYS.items())
    assert np.array_equal(dec["merge.1.layers.0.q"], ARRAYS["merge.1.layers.0.q"])  # merges stay exact
    adapter = [k for k in ARRAYS if codecs.applies_to(k)]
    for k in adapter:
        x, y = ARRAYS[k], dec[k]
        err = np.abs(y - x)
        if name == "fp32":
            assert np.array_equal(x, y)
        elif name == "fp16":
            assert (err <= 2.0 ** -11 * np.abs(x) + 2.0 ** -24).all()
        elif name == "bf16":
            assert (err <= 2.0 ** -8 * np.abs(x) + 1e-38).all()
        elif name == "int8":  # within half a step (absmax / 127) of the block's linear grid
            assert (err <= _blocks(x, 64) / 254 * (1 + 1e-5)).all()
        elif name == "nf4":
            assert (err <= _blocks(x, 64) * _max_gap(F.get_4bit_type("nf4", device="cpu")) * (1 + 1e-6)).all()
        elif name == "topk":  # the kept entries exact; the dropped ones are the smallest
            kept = y != 0
            assert kept.sum() == math.ceil(0.1 * x.size) and np.array_equal(y[kept], x[kept])
            assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min()
    sent = sum(a.nbytes for k, a in enc.items() if not k.startswith("merge."))
    full = sum(ARRAYS[k].nbytes for k in adapter)
    ratio = {"fp32": 1.0, "fp16": 2.0, "bf16": 2.0, "int8": 3.5, "nf4": 6.0, "topk": 4.0}[name]
    assert full / sent >= ratio  # scales, shapes and indices counted


def test_topk_sends_the_largest_entries_in_index_order_the_first_of_equal_ones_and_keeps_a_nan():
    """top-k's selection (a partition, not a sort): the same set as torch.topk where magnitudes differ; of equal
    magnitudes at the cut, the first in index order; indices ascending (the decoder refuses any other order); a NaN
    is kept, so the server's check refuses the update rather than receiving a tensor the NaN was dropped from."""
    c = Codec("topk", topk_fraction=0.1)
    x = np.random.default_rng(6).standard_normal((70, 31)).astype(np.float32)
    enc = codecs.encode(c, {"m.lora_A": x})
    want = np.sort(torch.topk(torch.from_numpy(np.abs(x).ravel()), math.ceil(0.1 * x.size)).indices.numpy())
    assert np.array_equal(enc["m.lora_A#idx"], want) and np.array_equal(enc["m.lora_A"], x.ravel()[want])
    ties = np.array([[1.0, -1.0, 0.25, 1.0, -1.0, 0.5]], np.float32)
    enc = codecs.encode(Codec("topk", topk_fraction=0.5), {"m.lora_A": ties})  # 3 of 6
    assert enc["m.lora_A#idx"].tolist() == [0, 1, 3] and enc["m.lora_A"].tolist() == [1.0, -1.0, 1.0]
    enc["m.lora_A#idx"] = enc["m.lora_A#idx"][[0, 2, 1]]
    with pytest.raises(CodecError, match="ascending order"):
        codecs.decode(Codec("topk", topk_fraction=0.5), enc)
    nan = np.array([[1.0, np.nan, 3.0, 0.5]], np.float32)
    half = Codec("topk", topk_fraction=0.5)
    dec = codecs.decode(half, codecs.encode(half, {"m.lora_A": nan}))["m.lora_A"]
    assert np.isnan(dec[0, 1]) and dec[0, 2] == 3.0


def test_error_feedback_keeps_the_sum_of_what_is_sent_within_one_residual():
    """Over 40 messages of fresh random tensors: with error feedback the summed decoded messages differ from the
    summed true tensors by exactly the last residual (float32 rounding), which stays one message's codec error in
    size; without it the difference grows with the number of messages."""
    rng = np.random.default_rng(1)
    for name in ("int8", "nf4", "topk"):
        c, residual = Codec(name, topk_fraction=0.25), {}
        true_sum = sent_sum = plain_sum = 0.0
        sizes = []
        for _ in range(40):
            x = {"m.lora_B": rng.standard_normal((64, 8)).astype(np.float32) + 0.3}
            enc, residual, _ = codecs.encode_with_feedback(c, x, residual)
            true_sum = true_sum + x["m.lora_B"].astype(np.float64)
            sent_sum = sent_sum + codecs.decode(c, enc)["m.lora_B"]
            plain_sum = plain_sum + codecs.decode(c, codecs.encode(c, x))["m.lora_B"]
            sizes.append(np.linalg.norm(residual["m.lora_B"]))
        gap = np.linalg.norm(sent_sum - true_sum)
        assert abs(gap - np.linalg.norm(residual["m.lora_B"])) <= 1e-3 * max(1.0, gap), name
        assert np.allclose(true_sum - sent_sum, residual["m.lora_B"], atol=1e-3)
        # without feedback the errors add up (top-k's residual holds several messages' dropped entries)
        assert gap < (0.5 if name == "topk" else 0.2) * np.linalg.norm(plain_sum - true_sum), name
        assert max(sizes[20:]) < 3 * max(sizes[:10]) + 1e-9, name  # bounded, not growing


def test_error_feedback_drops_a_residual_of_another_shape_and_is_off_for_fp32():
    x = {"m.lora_A": np.ones((2, 3), np.float32)}
    enc, res, err = codecs.encode_with_feedback(Codec("int8"), x, {"m.lora_A": np.ones((4, 3), np.float32)})
    assert np.allclose(codecs.decode(Codec("int8"), enc)["m.lora_A"], 1.0, atol=0.02) and set(res) == {"m.lora_A"}
    enc, res, err = codecs.encode_with_feedback(Codec("fp32"), x, {})
    assert res == {} and err == 0.0 and np.array_equal(enc["m.lora_A"], x["m.lora_A"])


def _malformed(name: str, enc: dict, rng) -> tuple[dict, str]:
    """One corruption of an encoded payload that the codec must refuse, and the kind. The block scales and shapes
    are message-level arrays (``#absmax``, ``#shape``); top-k's indices are the tensor's own (``<key>#idx``); int8
    sends every tensor's codes in one array (``#codes``) and their keys in another (``#keys``)."""
    e = {k: v.copy() for k, v in enc.items()}
    main = sorted(k for k in e if codecs.SEP not in k) or [codecs.CODES]
    k = main[rng.integers(len(main))]
    comp = [x for x in e if x.startswith(k + codecs.SEP)] + [x for x in (codecs.ABSMAX, codecs.SHAPES) if x in e]
    comp += [codecs.KEYS] if name == "int8" else []
    kinds = ["dtype", "orphan"] + (["drop_companion", "companion_dtype", "companion_2d"] if comp else [])
    kinds += {"int8": ["absmax_len", "absmax_nan", "absmax_neg", "shape", "codes_len", "keys", "padding"],
              "nf4": ["absmax_len", "nf4_bytes", "shape"], "topk": ["idx_range", "idx_dup", "idx_len", "shape"]
              }.get(name, [])
    kind = kinds[rng.integers(len(kinds))]
    if kind == "dtype":
        e[k] = e[k].astype(np.float64 if e[k].dtype != np.float64 else np.float32)
    elif kind == "orphan":  # a companion of a tensor the payload lacks, a stream this codec does not send, or
        # (int8) an adapter tensor outside #codes
        other = codecs.ABSMAX if name in ("fp16", "bf16", "topk") else "layers.9.v.lora_A" + (
            "" if name == "int8" else codecs.SEP + "idx")
        e[rng.choice(["layers.9.v.lora_A" + codecs.SEP + "absmax", other])] = np.ones(3, np.float32)
    elif kind == "drop_companion":
        e.pop(comp[rng.integers(len(comp))])
    elif kind == "companion_dtype":
        c = comp[rng.integers(len(comp))]
        e[c] = e[c].astype(np.float64)
    elif kind == "companion_2d":
        c = comp[rng.integers(len(comp))]
        e[c] = e[c].reshape(1, -1)
    elif kind == "absmax_len":  # too few scales for the tensors, or some left over
        a = e[codecs.ABSMAX]
        e[codecs.ABSMAX] = (a[: max(0, len(a) - 1 - int(rng.integers(3)))] if rng.integers(2)
                            else np.concatenate([a, np.ones(1 + int(rng.integers(3)), np.float32)]))
    elif kind == "absmax_nan":
        e[codecs.ABSMAX][rng.integers(len(e[codecs.ABSMAX]))] = rng.choice([np.nan, np.inf])
    elif kind == "absmax_neg":
        e[codecs.ABSMAX][rng.integers(len(e[codecs.ABSMAX]))] = -1.0
    elif kind == "nf4_bytes":
        e[k] = e[k][:-1]
    elif kind == "shape":  # negative sizes; (nf4) a size the bytes do not fill; or sizes left over
        s, how = e[codecs.SHAPES], rng.integers(3)
        if how == 0:
            e[codecs.SHAPES] = -s
        elif how == 1 and name in ("nf4", "int8"):  # (int8: a block more than the codes hold)
            s[-1] += np.int64(rng.integers(1, 3) if name == "nf4" else 64)
        else:
            e[codecs.SHAPES] = np.concatenate([s, np.ones(1, np.int64)])
    elif kind == "codes_len":  # a block short, or one left over
        c = e[codecs.CODES]
        e[codecs.CODES] = c[:-64] if rng.integers(2) else np.concatenate([c, np.ones(64, np.int8)])
    elif kind == "keys":  # not UTF-8, a key twice, out of order, not an adapter tensor, or also sent on its own
        keys, how = bytes(e[codecs.KEYS]).decode().split("\n"), rng.integers(5)
        if how == 0:
            e[codecs.KEYS] = np.concatenate([e[codecs.KEYS], np.full(1, 0xFF, np.uint8)])
        else:
            if how == 1:
                keys[1] = keys[0]
            elif how == 2:
                keys = keys[::-1]
            elif how == 3:
                keys[-1] = "head.weight"
            else:
                e[keys[0]] = np.ones(3, np.float32)
            e[codecs.KEYS] = np.frombuffer("\n".join(keys).encode(), np.uint8).copy()
    elif kind == "padding":  # a code in the padding of the last block of a tensor whose size is not whole blocks
        v, at, end = e[codecs.SHAPES].tolist(), 0, 0
        while at < len(v):
            n = math.prod(v[at + 1:at + 1 + v[at]])
            end, at = end + -(-n // 64) * 64, at + 1 + v[at]
            if n % 64:
                break
        e[codecs.CODES][end - 1] = 1
    elif kind == "idx_range":
        e[k + "#idx"][rng.integers(len(e[k + "#idx"]))] = rng.choice([-1, 10**6])
    elif kind == "idx_dup":
        e[k + "#idx"][-1] = e[k + "#idx"][0]
    elif kind == "idx_len":
        e[k + "#idx"] = e[k + "#idx"][:-1]
    return e, kind


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "nf4", "topk"])
def test_malformed_encoded_payloads_raise_one_sentence(name):
    rng = np.random.default_rng(2)
    enc = codecs.encode(Codec(name), {k: v for k, v in ARRAYS.items() if codecs.applies_to(k)})
    for _ in range(60):
        bad, kind = _malformed(name, enc, rng)
        with pytest.raises(CodecError) as e:
            codecs.decode(Codec(name), bad)
        # the message names the tensor, or (int8) the array of keys where the keys cannot be read
        assert str(e.value).count("\n") == 0 and any(w in str(e.value) for w in ("lora", "extra", codecs.KEYS)), kind


def test_fuzz_encoded_replies_are_refused_and_change_nothing():
    """≥1,000 malformed encoded replies over the lossy codecs, each beside three valid encoded ones: each is refused
    by the server's reply check with a reason naming the codec, the valid one(s) accepted; in every 20th case the
    whole round runs and the new global state is what the valid replies alone give."""
    rng = np.random.default_rng(3)
    cases = 0
    for name in ("fp16", "bf16", "int8", "nf4", "topk"):
        base = make_strategy("fedit", [4, 4, 4, 4])
        base.codec_up = Codec(name)
        nodes = sorted(base.nodes.values(), key=lambda n: n.partition_id)

        def enc_msg(node, arrays, metrics):
            return message(node, codecs.encode(base.codec_up, arrays), metrics)

        valid = {n.partition_id: valid_reply(base, n, rng) for n in nodes[1:]}
        ref = copy.deepcopy(base)
        assert not ref.aggregate_round(1, [enc_msg(n, *valid[n.partition_id]) for n in nodes[1:]]).rejected
        expected = snapshot(ref)
        good = codecs.encode(base.codec_up, valid_reply(base, nodes[0], rng)[0])
        others = [enc_msg(n, *valid[n.partition_id]) for n in nodes[1:]]
        for case in range(210):
            bad, kind = _malformed(name, good, rng)
            replies = [message(nodes[0], bad, valid_reply(base, nodes[0], rng)[1])] + others[: 1 if case % 20 else 3]
            random.Random(case).shuffle(replies)
            checked = base.check_replies(replies)  # the malformed one and one valid (all three every 20th case)
            assert len(checked.accepted) == (1 if case % 20 else 3), (name, kind)
            assert len(checked.rejected) == 1 and checked.rejected[0]["node"] == 0, (name, kind)
            assert checked.rejected[0]["reason"].startswith(f"undecodable reply (comm.up={name})"), (name, kind)
            if case % 20 == 0:
                s = copy.deepcopy(base)
                assert len(s.aggregate_round(1, replies).rejected) == 1
                assert all(torch.equal(snapshot(s)[k], v) for k, v in expected.items()), (name, kind)
            cases += 1
    assert cases >= 1000


def _as_sent_and_wide(strategy, ranks, name, seed, optimizer=None):
    """A strategy whose server reads ``comm.up=name`` replies as its class does, the same strategy decoding them to
    float32 first, one valid encoded reply from each node, and the last reply's arrays."""
    rng = np.random.default_rng(seed)
    s = make_strategy(strategy, ranks)
    s.codec_up = Codec(name)
    if optimizer is not None:
        s.server_opt = optimizer
    wide = copy.deepcopy(s)
    wide.sums_replies = False
    replies = []
    for n in sorted(s.nodes.values(), key=lambda n: n.partition_id):
        arrays, metrics = valid_reply(s, n, rng)
        replies.append(message(n, codecs.encode(s.codec_up, arrays), metrics))
    return s, wide, replies, arrays


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "topk"])
@pytest.mark.parametrize("strategy, ranks", [("fedit", [4, 4, 4, 4]), ("ffa_lora", [4, 4, 4, 4]),
                                             ("flora", [2, 3, 4, 5])])
def test_a_summing_server_reads_16bit_and_int8_replies_as_sent_and_aggregates_them_exactly(name, strategy, ranks):
    """FedIT and FFA-LoRA (``sums_replies``) take an fp16/bf16 reply as sent: the accepted update holds 16-bit
    tensors on the reply's own bytes, no float32 copy; the update norms and the audit's client states are bit for
    bit those of the same replies decoded to float32 first, and the round's new global state is the same weighted
    sum of the same float32 values (within that sum's rounding, whichever kernel adds a widened 16-bit value: see
    tolerances.py). An int8 reply is held as its codes and block scales (:class:`codecs.Int8Blocks`, the codes on
    the reply's bytes, one array a message): its audit states are bit for bit the float32 decoding, its norm the
    same within float32 rounding (summed from the codes), and the sum scales each code as it adds it (three more
    roundings a term). A top-k reply is held as its kept entries (:class:`codecs.TopkEntries`, on the reply's
    bytes): its norm is the kept values' (the same within float32 rounding) and the sum adds them at their indices.
    A strategy that does more than sum (FLoRA) gets float32."""
    s, wide, replies, arrays = _as_sent_and_wide(strategy, ranks, name, 11)
    enc = codecs.encode(s.codec_up, arrays)
    as_sent = codecs.decode(s.codec_up, enc, wide=False)
    if name == "int8":  # every tensor's codes on the message's codes (#codes, as it arrived), its scales one column
        assert {(t.codes.data_ptr(), t.scales.data_ptr()) for t in as_sent.values()} == \
            {(enc[codecs.CODES].ctypes.data, as_sent["extra.head.weight"].scales.data_ptr())}
    elif name == "topk":  # indices and values on the payload's bytes
        assert all((t.idx.data_ptr(), t.vals.data_ptr()) == (enc[k + "#idx"].ctypes.data, enc[k].ctypes.data)
                   for k, t in as_sent.items())
    else:
        assert all(t.data_ptr() == enc[k].ctypes.data for k, t in as_sent.items())  # on the payload's bytes
    narrow_checked, wide_checked = s.check_replies(replies), wide.check_replies(replies)
    assert len(narrow_checked.accepted) == len(wide_checked.accepted) == 4
    got = {type(a).__name__ + ":" + str(a.dtype) for u in narrow_checked.accepted for a in u.arrays.values()}
    held = {"int8": "Int8Blocks:torch.int8", "topk": "TopkEntries:torch.float32"}.get(
        name, f"Tensor:{codecs.WIRE_DTYPES.get(name)}")
    assert got == ({held} if strategy != "flora" else {"ndarray:float32"})
    for u, v in zip(narrow_checked.accepted, wide_checked.accepted):
        widened = {k: a.float().numpy() if codecs.as_sent(a) else a for k, a in u.arrays.items()}
        assert {k: a.dtype for k, a in widened.items()} == {k: a.dtype for k, a in v.arrays.items()}
        assert all(np.array_equal(widened[k], v.arrays[k]) for k in v.arrays)
        n = sum(a.size for a in v.arrays.values())  # a sum of n positive squares, a scale squared and a product
        assert math.isclose(validate.update_norm(u.arrays), validate.update_norm(v.arrays),
                            rel_tol=0 if name in ("fp16", "bf16") or strategy == "flora" else gamma(n + 6))
    a, b = s.aggregate_round(1, replies), wide.aggregate_round(1, replies)
    assert not a.rejected and not b.rejected and a.metrics.keys() == b.metrics.keys()
    # the clients' own numbers are the same; the cross-term error ||s B A - dW*|| / ||dW*|| moves with the served
    # product by at most ||served_a - served_b|| / ||dW*|| (triangle inequality) = that ratio over ||served_b|| times
    # ||served_b|| / ||dW*|| <= 1 + e_b (float64 rounding of the metric itself: 1e-12)
    assert {k: v for k, v in a.metrics.items() if k != "cross_term_error"} == \
        {k: v for k, v in b.metrics.items() if k != "cross_term_error"}
    if "cross_term_error" in b.metrics:
        e_b = b.metrics["cross_term_error"]
        moved = diagnostics.cross_term_error(s.state, [wide.state], [1.0])
        assert abs(a.metrics["cross_term_error"] - e_b) <= moved * (1 + e_b) + 1e-12
    largest = max(float(np.abs(x).max()) for u in wide_checked.accepted for x in u.arrays.values())
    # sum_k p_k x_k with sum_k p_k = 1: at most K + 1 roundings; int8 also rounds x_k = q_k a_k / 127 differently
    bound = f32_tol(len(replies) + (4 if name == "int8" else 1), largest)
    for k, v in snapshot(wide).items():
        assert_within(snapshot(s)[k], v, bound, k)
    for (_, st_a, _), (_, st_b, _) in zip(a.client_states, b.client_states):  # what the audit writes
        assert all(np.array_equal(x, to_arrays(st_b)[k]) for k, x in to_arrays(st_a).items())


def test_int8_replies_as_sent_serve_every_reader_of_the_client_states_their_decoding():
    """Readers of the clients' states other than the sum (FedExP's step size, the cross-term error, the audit) see an
    int8 reply's float32 decoding through :class:`codecs.Int8Blocks`: a FedExP round on replies as sent serves what
    it serves on the same replies decoded first, within float32 rounding, with the same step size."""
    from fedlora import server_opt

    s, wide, replies, _ = _as_sent_and_wide("fedit", [4, 4, 4, 4], "int8", 13,
                                            server_opt.ServerOptimizer(server_opt.ServerOptConfig("fedexp")))
    a, b = s.aggregate_round(1, replies), wide.aggregate_round(1, replies)
    assert not a.rejected and not b.rejected and a.arrays is not None
    assert math.isclose(s.server_opt.last_lr, wide.server_opt.last_lr, rel_tol=1e-5)
    assert math.isclose(a.metrics["cross_term_error"], b.metrics["cross_term_error"], rel_tol=1e-4, abs_tol=1e-9)
    for k, v in snapshot(wide).items():
        np.testing.assert_allclose(snapshot(s)[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    A = next(iter(a.client_states[0][1].lora.values())).A
    assert isinstance(A, codecs.Int8Blocks)
    with pytest.raises(TypeError):  # the codes are never read as values: an op with no float32 side is refused
        A @ A


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_a_nan_or_inf_in_a_16bit_reply_read_as_sent_is_refused_by_name(name):
    rng = np.random.default_rng(12)
    s = make_strategy("fedit", [4, 4, 4, 4])
    s.codec_up = Codec(name)
    node = s.nodes[100]
    big = 6e4 if name == "fp16" else 3e38  # finite, near the dtype's largest: its square still fits float64
    for bad, refused in ((np.nan, True), (np.inf, True), (-np.inf, True), (big, False)):
        arrays, metrics = valid_reply(s, node, rng)
        key = sorted(arrays)[1]
        arrays[key].flat[3] = bad
        checked = s.check_replies([message(node, codecs.encode(s.codec_up, arrays), metrics)])
        if refused:
            assert [r["reason"] for r in checked.rejected] == [f"{key}: contains NaN or Inf"], bad
        else:
            assert not checked.rejected and len(checked.accepted) == 1


def test_the_update_checks_sum_of_squares_decides_finiteness_exactly():
    """The reply check's one pass (a float32 dot of each tensor with itself) is also its NaN/Inf check: finite values
    whose squares overflow float32 are accepted, with the norm redone in float64; a NaN or Inf anywhere is refused.
    The same for 16-bit tensors read as sent."""
    key, expected = "m.lora_A", {"m.lora_A": (2, 3)}
    a = np.zeros((2, 3), np.float32)
    a[0, 1], a[1, 2] = 3e38, -4e30
    for x in (a, torch.from_numpy(a).bfloat16()):
        assert validate.check_update({key: x}, expected, 1, None) is None
        assert math.isclose(validate.update_norm({key: x}), float(np.hypot(3e38, 4e30)), rel_tol=1e-2)
    assert math.isclose(validate.update_norm({key: a}), float(np.hypot(a[0, 1], a[1, 2])), rel_tol=1e-12)
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[1, 0] = bad
        for x in (b, torch.from_numpy(b).bfloat16(), torch.from_numpy(b / 1e35).half()):
            assert validate.check_update({key: x}, expected, 1, None) == f"{key}: contains NaN or Inf"


def test_config_errors_are_one_sentence():
    for overrides, says in [(["comm.up=int4"], "comm.up=int4 is not a codec"),
                            (["comm.down=zip"], "comm.down=zip is not a codec"),
                            (["comm.topk_fraction=0"], "comm.topk_fraction"),
                            (["comm.blocksize=100"], "comm.blocksize=100 must be a power of 2"),
                            (["privacy=client_level", "comm.up=int8"], "cannot run with privacy=client_level")]:
        with pytest.raises(config.ConfigError, match=says):
            config.load(overrides)
    config.load(["privacy=client_level"])  # fp32 both ways: as before


# ------------------------------------------------------------------------------------------------ runs
TINY = ["model=tiny_llama", "num_clients=3", "num_rounds=2", "local_steps=1", "train.batch_size=4",
        "eval.max_examples=8", "train.max_length=32", "min_train_nodes=3"]


def _run(tmp_path, label, overrides):
    from harness import InProcessGrid

    from fedlora.strategies.server_app import run_server

    d = tmp_path / label
    run_server(InProcessGrid(3), config.load(TINY + overrides), d, echo=lambda *_: None)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return d, rows


def test_runs_count_encoded_bytes_and_record_the_codec_error(tmp_path):
    """fedit for 2 rounds with int8 up / nf4 down, bf16 up / topk down and topk up / int8 down (top-k replies read
    as sent, int8 payloads as one array of codes), against fp32: every round completes
    with all three clients; the bytes counted are those of the encoded records (each reply: the audited client
    adapter encoded by the codec; each payload: the fp32 run's global adapter as the codec encodes it, per node);
    the metrics carry the codec errors and the audit a codec.json per round with per-tensor downlink and per-client
    uplink errors; fp32 writes none of it."""
    from fedlora import adapters
    from fedlora.strategies.base import record_bytes, to_record

    _, plain = _run(tmp_path, "fp32", ["audit=true"])
    for up, down in [("int8", "nf4"), ("bf16", "topk"), ("topk", "int8")]:
        d, rows = _run(tmp_path, f"{up}-{down}", [f"comm.up={up}", f"comm.down={down}", "audit=true"])
        for r, p in zip(rows[1:], plain[1:]):
            assert r["num_clients"] == 3 and not r.get("rejected")
            audit = d / "audit" / f"round_{r['round']:04d}"
            replies = [adapters.to_arrays(adapters.load_file(audit / f"client_{i:03d}.safetensors")) for i in range(3)]
            assert r["bytes_up"] == sum(record_bytes(to_record(codecs.encode(Codec(up), a))) for a in replies)
            assert r["bytes_up"] < p["bytes_up"] and r["bytes_down"] < p["bytes_down"]
            assert 0 < r["codec_up_error"] < (1 if up == "topk" else 0.05) and 0 < r["codec_down_error"] < 1
            got = json.loads((audit / "codec.json").read_text())
            assert (got["up_codec"], got["down_codec"]) == (up, down)
            assert set(got["up"]) == {"0", "1", "2"} and max(got["up"].values()) == pytest.approx(r["codec_up_error"])
            assert max(got["down"].values()) == pytest.approx(r["codec_down_error"])
    assert "codec_up_error" not in plain[1] and not list((tmp_path / "fp32").rglob("codec.json"))


def test_dp_sgd_epsilon_is_untouched_by_a_lossy_uplink(tmp_path):
    """A codec is post-processing of the DP-SGD release: the same run with comm.up=int8 reports the same epsilon,
    round by round, as with fp32."""
    dp = ["privacy=dp_sgd", "privacy.target_epsilon=8", "privacy.reproducible=true"]
    _, plain = _run(tmp_path, "dp-fp32", dp)
    _, coded = _run(tmp_path, "dp-int8", dp + ["comm.up=int8"])
    eps = [k for k in plain[1] if "epsilon" in k]
    assert eps and all(p[k] == c[k] for p, c in zip(plain[1:], coded[1:]) for k in eps)
    assert "codec_up_error" in coded[1]


def test_scales_and_shapes_travel_as_two_message_level_arrays_so_headers_do_not_eat_the_savings():
    """A MiniLM-shaped reply (12 modules x 2 factors of rank 8 at 384, a 2x384 head) counted as Flower serializes
    it (``.npy`` bytes, headers included): one array per tensor plus ``#absmax``/``#shape`` (int8: all the codes in
    one array, ``#codes``, with the keys, ``#keys``), so int8 sends >= 3.7x fewer bytes than fp32 (3.66x with an
    array per tensor) and nf4 >= 6x (with one scale and one shape array per tensor, nf4 was 5.8x)."""
    from strategies.base import record_bytes, to_record

    rng = np.random.default_rng(4)
    reply = {f"layers.{i}.{m}.lora_{f}": rng.standard_normal((8, 384) if f == "A" else (384, 8)).astype(np.float32)
             for i in range(6) for m in ("query", "value") for f in "AB"}
    reply["extra.head.weight"] = rng.standard_normal((2, 384)).astype(np.float32)
    fp32 = record_bytes(to_record(reply))
    for name, goal, extra in (("int8", 3.7, [codecs.KEYS, codecs.CODES, codecs.ABSMAX, codecs.SHAPES]),
                              ("nf4", 6.0, [*reply, codecs.ABSMAX, codecs.SHAPES]),
                              ("topk", 1.0, [*reply, codecs.SHAPES] + [k + "#idx" for k in reply])):
        enc = codecs.encode(Codec(name), reply)
        assert sorted(enc) == sorted(extra), name
        assert fp32 / record_bytes(to_record(enc)) >= goal, name
        assert all(np.array_equal(codecs.decode(Codec(name), enc)[k], codecs.decode(Codec(name), codecs.encode(
            Codec(name), {k: v}))[k]) for k, v in list(reply.items())[:3])  # a tensor's code does not depend on others


def test_a_payload_is_encoded_once_a_round_whether_found_by_its_memory_or_by_its_content(monkeypatch):
    """base.encode_payload through payloads.Payloads: outside build_messages FedIT's payload is a new dict for every
    node, whose arrays view the state's tensors, so nodes after the first find it by memory (no hash; the same dict
    again is found by identity); a copy of it (other memory, same content) finds it by hash; a payload of other
    content is encoded anew. The error each payload records is the codec's (int8: at most absmax / 254 a value)."""
    s = make_strategy("fedit", [4, 4, 4, 4], ["comm.down=int8"])
    calls, encode, digests = [], codecs.encode, []
    monkeypatch.setattr(codecs, "encode", lambda c, a, **kw: calls.append(1) or encode(c, a, **kw))
    monkeypatch.setattr(payloads, "digest", lambda a, d=payloads.digest: digests.append(1) or d(a))
    encoded = payloads.Payloads()
    sent = [s.payload(node, 1)[0] for node in s.nodes.values()]
    assert len({id(p) for p in sent}) == 4
    first = [s.encode_payload(p, encoded) for p in sent + sent[:1]]
    assert len(calls) == 1 and all(e is first[0] for e in first) and not digests
    arrs = s.payload(next(iter(s.nodes.values())), 1)[0]
    copy_ = {k: v.copy() for k, v in arrs.items()}
    assert s.encode_payload(copy_, encoded) is first[0] and len(calls) == 1
    other = {k: v * 2 for k, v in arrs.items()}
    enc = s.encode_payload(other, encoded)
    assert len(calls) == 2 and not np.array_equal(enc["#absmax"], first[0]["#absmax"])
    assert 0 < max(s.down_errors.values()) < 1 / 127


def test_relative_error_is_the_float64_one_to_float32_precision():
    rng = np.random.default_rng(3)
    true = {"a": rng.standard_normal((64, 16)).astype(np.float32), "b": np.float32(3) * np.ones(5, np.float32)}
    sent = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 1e-3).astype(np.float32) for k, v in true.items()}
    exact = math.sqrt(sum(np.sum((sent[k].astype(np.float64) - true[k]) ** 2) for k in true)
                      / sum(np.sum(true[k].astype(np.float64) ** 2) for k in true))
    n = sum(v.size for v in true.values())  # float32 sums of n squares (each from a rounded difference), any order
    assert abs(codecs.relative_error(true, sent) - exact) <= gamma(2 * n + 3) * exact
    big = {"a": np.full(4, 1e30, np.float32)}  # squares overflow float32: summed in float64
    assert codecs.relative_error(big, {"a": big["a"] * np.float32(1.5)}) == pytest.approx(0.5, rel=1e-6)
    assert codecs.relative_error({"a": np.zeros(3, np.float32)}, {"a": np.ones(3, np.float32)}) == 0.0


@pytest.mark.parametrize("down", ["fp32", "int8"])
def test_nodes_that_get_the_same_payload_share_one_serialised_record(down):
    """build_messages serialises a payload once a round (33.6 MB of a Llama-7B-shaped adapter took 25 ms a node):
    FedIT's four nodes share one ArrayRecord, each still counted in the round's downlink bytes. Payloads built anew
    for each node (here one a rank) get their own record; two equal ones in different memory share one only under
    a lossy codec, which finds them by content (fp32 does not hash: it would cost more than the record)."""
    from strategies.base import record_bytes

    s = make_strategy("fedit", [4, 4, 4, 4], [f"comm.down={down}"])
    plan = s.build_messages(1)
    assert len(plan.messages) == 4 and len({id(m.content["arrays"]) for m in plan.messages}) == 1
    assert plan.bytes_down == 4 * record_bytes(plan.messages[0].content["arrays"])
    h = make_strategy("hetlora", [2, 4, 8, 4], [f"comm.down={down}"])
    h.payload = lambda node, rnd: ({"extra.head.weight": np.full((2, 12), node.rank, np.float32)}, {})
    plan = h.build_messages(1)
    got = {}
    for m in plan.messages:
        arrays = m.content["arrays"]
        got.setdefault(h.nodes[m.metadata.dst_node_id].rank, []).append(id(arrays))
        value = codecs.decode(h.codec_down, {k: a.numpy() for k, a in arrays.items()})["extra.head.weight"]
        assert np.all(value == h.nodes[m.metadata.dst_node_id].rank)  # each node its own payload
    assert len({i for ids in got.values() for i in ids}) == (4 if down == "fp32" else 3)


def test_the_state_arrays_are_shared_only_while_the_messages_are_built(monkeypatch):
    """state_arrays gives every node one dict while build_messages runs, and a fresh one outside it, also after a
    payload hook raised mid-way (a later change to the state is never served stale)."""
    s = make_strategy("fedit", [4, 4, 4, 4])
    node = next(iter(s.nodes.values()))
    assert s.payload(node, 1)[0] is not s.payload(node, 1)[0]
    payload, seen = s.payload, []
    monkeypatch.setattr(s, "payload", lambda n, r: seen.append(payload(n, r)[0]) or payload(n, r))
    s.build_messages(1)
    assert len(seen) == 4 and all(p is seen[0] for p in seen)
    monkeypatch.setattr(s, "payload", lambda n, r: payload(n, r) and 1 / 0)  # (after taking the arrays)
    with pytest.raises(ZeroDivisionError):
        s.build_messages(2)
    monkeypatch.setattr(s, "payload", payload)
    s.state = copy.deepcopy(s.state)  # a new state (as an aggregation makes): served, not the old one's arrays
    s.state.extra["head.weight"] += 1
    assert np.array_equal(s.payload(node, 3)[0]["extra.head.weight"], s.state.extra["head.weight"].numpy())
    assert s.build_messages(3).messages[0].content["arrays"]["extra.head.weight"].numpy().tolist() == \
        s.state.extra["head.weight"].tolist()
