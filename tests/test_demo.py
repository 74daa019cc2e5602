import json

import pytest
import torch
from transformers import AutoTokenizer

from l2pd.demo import MODEL_DIR
from l2pd.demo.task import HARD_TEST_SEEDS, TEST_SEEDS, TRAIN_SEEDS, extract_answer, is_correct, problem, split
from l2pd.models.llada import LLaDAModelLM

FACTS_KEYS = {
    "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "rope", "rope_theta", "rope_full_precision",
    "max_sequence_length", "layer_norm_type", "rms_norm_eps", "activation_type", "block_type", "vocab_size",
    "embedding_size", "weight_tying", "include_bias", "mask_token_id", "eos_token_id", "pad_token_id",
    "architectures", "model_type",
}


def test_generator_is_deterministic_and_splits_disjoint():
    assert problem(123) == problem(123)
    assert split("test", 5) == split("test", 5)
    assert split("train", 3, offset=2)[0] == problem(TRAIN_SEEDS[2])
    assert TRAIN_SEEDS.stop <= TEST_SEEDS.start
    assert split("test", 1)[0] == problem(TEST_SEEDS.start)
    with pytest.raises(ValueError, match="split"):
        split("dev", 1)
    # the hard level: its own test seeds, the same train seeds at another level, deterministic
    assert TEST_SEEDS.stop <= HARD_TEST_SEEDS.start
    assert split("hard-test", 1)[0] == problem(HARD_TEST_SEEDS.start, "hard")
    assert split("hard-train", 2)[1] == problem(TRAIN_SEEDS[1], "hard") != problem(TRAIN_SEEDS[1])
    with pytest.raises(ValueError, match="level"):
        problem(1, "harder")


@pytest.mark.parametrize("name, steps", [("train", (1, 4)), ("hard-train", (5, 6)), ("hard-test", (5, 6))])
def test_problems_are_consistent(name, steps):
    for p in split(name, 300):
        assert extract_answer(p.solution) == p.answer
        assert 0 <= p.answer <= 999
        assert steps[0] <= p.steps <= steps[1]
        for line in p.solution.splitlines()[1:-1]:  # every worked line's arithmetic is right
            expr, result = line.split(" = ")
            lhs = expr.rsplit(" is ", 1)[-1].rsplit(" so ", 1)[-1].rsplit(" hold ", 1)[-1].rsplit(" has ", 1)[-1]
            a, op, b = lhs.split()
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
            assert value == int(result.split()[0]), line


@pytest.mark.parametrize(
    "text, expected",
    [(None, None), ("", None), ("####", None), ("#### abc", None), ("no marker 12", None), (b"#### 3", None),
     ("x\n#### 42", 42), ("#### -5", -5), ("####7 and #### 8", 7), ("#### 12 apples", 12), (12, None)],
)
def test_answer_checker_never_crashes(text, expected):
    assert extract_answer(text) == expected
    assert is_correct(text, 42) == (expected == 42)


def test_tokenizer_round_trip_and_special_ids():
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    specials = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(6))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (0, 1, 1, 2)
    for p in split("test", 20):
        ids = tok(p.solution, add_special_tokens=False).input_ids
        assert tok.decode(ids) == p.solution
    digits = tok("9071", add_special_tokens=False).input_ids
    assert len(digits) == 4  # one token per digit
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_bundled_checkpoint_is_in_the_official_format():
    with open(f"{MODEL_DIR}/config.json") as f:
        cfg = json.load(f)
    assert FACTS_KEYS <= set(cfg)
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    assert (cfg["mask_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 1)
    model = LLaDAModelLM.from_pretrained(MODEL_DIR)
    names = set(model.state_dict())
    assert "model.transformer.wte.weight" in names and "model.transformer.ff_out.weight" in names
    assert f"model.transformer.blocks.{cfg['n_layers'] - 1}.up_proj.weight" in names


def test_bundled_model_greedy_answer_is_fixed_and_correct():
    import l2pd.demo
    from l2pd.evaluate import answer_texts, encode_prompts

    torch.manual_seed(0)
    model, tok = l2pd.demo.load(device="cpu", filter=False)
    p = split("test", 1)[0]
    ids, mask = encode_prompts(tok, [p.question], "cpu")
    out = model.generate(ids, mask, max_new_tokens=64, block_length=32, strategy="steps", cache="none")
    text = answer_texts(tok, out, ids.shape[1])[0]
    assert text == "Iris starts with 112 toy cars.\nTwice as many is 112 * 2 = 224 toy cars.\n#### 224"
    assert is_correct(text, p.answer)


def test_bundled_dream_model_and_filter(monkeypatch):
    """The Dream-format bundle: the official module tree and config, its shared filter at block 128, and
    learn2pd + EoTP answering held-out problems in a few forwards."""
    import l2pd.demo

    monkeypatch.setenv("L2PD_BACKEND", "torch")  # the decision's PyTorch ops: the kernels have their own tests
    from l2pd.evaluate import evaluate
    from l2pd.models.dream import DreamModel

    with open(f"{l2pd.demo.DREAM_DIR}/config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
    model, tok = l2pd.demo.load(device="cpu", family="dream")
    assert isinstance(model, DreamModel)
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias"} <= names
    flt = model.l2pd_filter
    assert (flt.kind, flt.block_length, flt.meta["eotp"]) == ("shared", 128, "accepted")
    r = evaluate(model, tok, split("test", 4), batch_size=4, progress=False)  # the filter's operating point
    assert r["accuracy"] == 1.0 and r["mean_nfe"] < 6, r
    with pytest.raises(ValueError, match="bundled models"):
        l2pd.demo.load(device="cpu", family="mdm")


def test_bundled_llada2_model_and_filter(monkeypatch):
    """The LLaDA 2.x-format bundle: the official layout (fused q/k/v, routed and shared experts), under 15 MB,
    its filter found and fitting it; its shipped default (filter + EoTP at block 32) answers held-out problems
    in a few forwards."""
    import os

    monkeypatch.setenv("L2PD_BACKEND", "torch")  # the decision's PyTorch ops: the kernels have their own tests
    import l2pd.demo
    from l2pd.evaluate import evaluate
    from l2pd.models import LLaDA2MoeModelLM

    folder = l2pd.demo.FAMILIES["llada2"][0]
    assert os.path.getsize(os.path.join(folder, "model.safetensors")) < 15e6
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llada2_moe" and cfg["num_experts"] == 8
    model, tok = l2pd.demo.load(device="cpu", family="llada2")
    assert isinstance(model, LLaDA2MoeModelLM)
    names = set(model.state_dict())
    assert {"model.layers.0.attention.query_key_value.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
            "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.1.mlp.gate.expert_bias",
            "lm_head.weight"} <= names
    flt = model.l2pd_filter
    assert (flt.kind, flt.block_length, flt.meta["eotp"]) == ("shared", 32, "accepted")
    r = evaluate(model, tok, split("test", 4), batch_size=4, progress=False)
    assert r["accuracy"] == 1.0 and r["mean_nfe"] < 20, r


@pytest.mark.parametrize("family,forwards", [("dream", 6), ("llada2", 20)])
def test_cli_model_family_picks_the_bundle_and_refuses_with_model(capsys, monkeypatch, family, forwards):
    from l2pd.cli import main

    monkeypatch.setenv("L2PD_BACKEND", "torch")  # the decision's PyTorch ops: the kernels have their own tests
    assert main(["eval", "--model-family", family, "--problems", "2", "--batch-size", "2", "--device", "cpu",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["problems"] == 2 and r["accuracy"] == 1.0 and r["mean_nfe"] < forwards
    assert main(["eval", "--model-family", family, "--model", MODEL_DIR, "--problems", "1", "--device",
                 "cpu"]) == 2
    assert "--model-family picks a bundled model" in capsys.readouterr().err


def test_training_mix_has_the_hard_fraction_on_disjoint_seeds():
    from l2pd.demo.train_model import HARD_PROMPT_SLOTS, encode, make_problems

    base = make_problems(40, workers=1, first=7)
    mixed = make_problems(40, workers=1, first=7, hard_fraction=0.25)
    assert mixed[:30] == base[:30]  # the first 75% of the seeds keep their base problems
    assert [q for q, _ in mixed[30:]] == [problem(TRAIN_SEEDS[7 + i], "hard").question for i in range(30, 40)]
    assert all(a.count("=") >= 5 for _, a in mixed[30:])
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    prompts, answers = encode(tok, mixed, HARD_PROMPT_SLOTS)
    assert prompts.shape == (40, HARD_PROMPT_SLOTS) and answers.shape[0] == 40


def test_cli_level_picks_the_hard_split_and_refuses_with_data(tmp_path, capsys, monkeypatch):
    import importlib

    from l2pd.cli import main

    seen = {}

    def fake_evaluate(model, tok, problems, **kw):
        seen["problems"] = problems
        return {"problems": len(problems), "accuracy": 0.0, "mean_nfe": 1.0, "tokens_per_s": 1.0, "seconds": 1.0,
                "texts": [], "nfe": []}

    monkeypatch.setattr(importlib.import_module("l2pd.evaluate"), "evaluate", fake_evaluate)
    assert main(["eval", "--level", "hard", "--problems", "3", "--device", "cpu", "--json"]) == 0
    assert seen["problems"] == split("hard-test", 3)
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "q", "answer": 1}\n')
    assert main(["sweep", "--level", "hard", "--data", str(data), "--device", "cpu"]) == 2
    assert "--level picks the bundled task's problems" in capsys.readouterr().err
    assert main(["collect", "--policy", "threshold:2", "--out", str(tmp_path / "c"), "--device", "cpu"]) == 2
    assert "argument --policy: 'threshold:2'" in capsys.readouterr().err
