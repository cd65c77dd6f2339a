"""The real offline weights: MiniLM (encoder) and SmolLM2-135M-Instruct (decoder, GGUF)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loradrop
from loradrop import LoraDropoutConfig
from loradrop.errors import UsageError
from loradrop.pretrained import ModelLoadError, load_model, load_tokenizer, smollm2_gguf


@pytest.fixture(scope="module")
def minilm():
    try:
        tokenizer = load_tokenizer("minilm")
        model = load_model("minilm", "classification", num_labels=3)
    except ModelLoadError as err:
        pytest.skip(str(err))
    return tokenizer, model


@pytest.fixture(scope="module")
def smollm2():
    try:
        smollm2_gguf()
        pytest.importorskip("gguf", reason="de-quantising the GGUF needs the gguf package")
        return load_tokenizer("smollm2"), load_model("smollm2", "causal_lm")
    except ModelLoadError as err:
        pytest.skip(str(err))


def test_minilm_parity_training_and_ensemble(minilm):
    tokenizer, base = minilm
    torch.manual_seed(0)
    peft_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0,
                          task_type="SEQ_CLS")
    ref = get_peft_model(copy.deepcopy(base), peft_cfg)
    ours = loradrop.apply_lora_dropout(copy.deepcopy(ref), LoraDropoutConfig(p=0.0, seed=0))
    batch = tokenizer(["what a great day", "this is terrible", "the bus leaves at noon"], padding=True,
                      return_tensors="pt")
    labels = torch.tensor([2, 0, 1])
    ref.eval(), ours.eval()  # MiniLM has hidden dropout: compare in eval, gradients with dropout off
    assert torch.equal(ref(**batch).logits, ours(**batch).logits)
    ref(**batch, labels=labels).loss.backward()
    ours(**batch, labels=labels).loss.backward()
    for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
        if p_ref.grad is not None:
            assert torch.equal(p_ref.grad, p_ours.grad), name

    model = loradrop.apply_lora_dropout(get_peft_model(copy.deepcopy(base), peft_cfg),
                                        LoraDropoutConfig(p=0.5, samples=4, seed=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    out = loradrop.ensemble_predict(model, batch, 8, chunk_size=4, seed=0)
    assert out.probs.shape == (3, 3) and torch.equal(out.predictions, labels)


def test_smollm2_ensemble_generation_and_choices(smollm2):
    tokenizer, base = smollm2
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    with model.disable_adapter(), pytest.raises(UsageError, match="needs LoRA Dropout's masks"):
        loradrop.ensemble_generate(model, torch.tensor([[1, 2, 3]]), 2, 2)  # no masks act: refused, not spread 0
    # with B = 0 every masked member is the pretrained model, which answers sensibly
    b_weights = [m.lora_B["default"].weight for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    saved = [w.detach().clone() for w in b_weights]
    with torch.no_grad():
        for w in b_weights:
            w.zero_()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loradrop.ensemble_generate(model, prompt["input_ids"], 4, 8, attention_mask=prompt["attention_mask"],
                                     seed=0)
    with torch.no_grad():
        for w, value in zip(b_weights, saved):
            w.copy_(value)
    text = tokenizer.decode(out.new_tokens[0], skip_special_tokens=True)
    assert "Paris" in text
    assert out.new_tokens.shape[1] <= 8 and torch.isfinite(out.entropy).all()

    question = ("The following are multiple choice questions (with answers) about geography.\n\n"
                "What is the capital of France?\nA. Berlin\nB. Paris\nC. Rome\nD. Madrid\nAnswer:")
    enc = tokenizer([question], return_tensors="pt")
    choices = [tokenizer.encode(f" {c}", add_special_tokens=False)[-1] for c in "ABCD"]
    scores = loradrop.ensemble_score_choices(model, enc["input_ids"], choices, 4, attention_mask=enc["attention_mask"],
                                             seed=0)
    assert scores.probs.shape == (1, 4)
    torch.testing.assert_close(scores.probs.sum(-1), torch.ones(1))
    assert scores.mutual_information.item() > 0  # LoRA (non-zero B) + masks: members disagree a little
