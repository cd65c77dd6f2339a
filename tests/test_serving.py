"""Serving export: masked members written as plain PEFT adapters reproduce the ensemble's members when plain PEFT runs
them in one mixed batch (``adapter_names``), and the client-side aggregation equals `ensemble_predict`."""

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model

import loradrop
from helpers import lora_config, tiny_bert_config
from loradrop import LoraDropoutConfig, ensemble_predict
from loradrop.serving import MEMBERS_FILE, aggregate_member_probs, export_members

INPUTS = {"input_ids": torch.randint(0, 120, (4, 10), generator=torch.Generator().manual_seed(1)),
          "attention_mask": torch.ones(4, 10, dtype=torch.long)}


def bert_pair(**lora):
    """(a fresh copy of the base model, a LoRA model of it), with non-zero A and B and a trained-looking head."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config())
    clean = copy.deepcopy(base)
    return clean, get_peft_model(base, lora_config(target_modules=["query", "value"], **lora))


def mixed_batch_probs(clean_base, folders, inputs):
    """Plain PEFT, no loradrop: load every member as an adapter, run all of them in one mixed batch."""
    names = [folder.name for folder in folders]
    served = PeftModel.from_pretrained(clean_base, str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        served.load_adapter(str(folder), adapter_name=name)
    served.eval()
    batch = inputs["input_ids"].shape[0]
    repeated = {k: v.repeat(len(names), 1) for k, v in inputs.items()}
    with torch.no_grad():
        logits = served(**repeated, adapter_names=[name for name in names for _ in range(batch)]).logits
    return logits.softmax(-1).view(len(names), batch, -1)


@pytest.mark.parametrize("config, lora", [(LoraDropoutConfig(p=0.5, seed=0), {}),
                                          (LoraDropoutConfig(p=0.3, seed=1, rescale=True, strategy="rank"), {}),
                                          (LoraDropoutConfig(p=0.4, seed=2, strategy="b"), {"lora_bias": True})])
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT misreads lora_B's 1-d bias
def test_exported_members_reproduce_the_ensemble_in_a_plain_peft_mixed_batch(tmp_path, config, lora):
    clean, model = bert_pair(**lora)
    loradrop.apply_lora_dropout(model, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = ensemble_predict(model, INPUTS, 3, seed=5)
    folders = export_members(model, 3, tmp_path / "members", seed=5)
    assert [f.name for f in folders] == ["member_0", "member_1", "member_2"]
    for name, value in model.state_dict().items():  # the model is left as it was
        assert torch.equal(value, before[name]), name
    for folder in folders:  # ordinary PEFT adapters, nothing of loradrop
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "loradrop_config.json").exists()
    info = json.loads((tmp_path / "members" / MEMBERS_FILE).read_text())
    assert info["n"] == 3 and info["seed"] == 5 and info["strategy"] == config.strategy
    member_probs = mixed_batch_probs(clean, folders, INPUTS)
    torch.testing.assert_close(member_probs, expected.member_probs, atol=1e-5, rtol=1e-4)
    aggregated = aggregate_member_probs(list(member_probs))
    torch.testing.assert_close(aggregated["probs"].float(), expected.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(aggregated["mutual_information"].float(), expected.mutual_information,
                               atol=1e-5, rtol=1e-3)
    assert not torch.allclose(member_probs[0], member_probs[1])  # the members really differ


def test_aggregate_log_probabilities_and_refusals(tmp_path, one_linear):
    members = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]], dtype=torch.float64)
    from_logs = aggregate_member_probs([members[0].log(), members[1].log()], log=True)
    torch.testing.assert_close(from_logs["probs"], torch.tensor([[0.7, 0.3]], dtype=torch.float64))
    truncated = aggregate_member_probs(torch.tensor([[[-1.0, -1.0]]]), log=True)  # a top-2 of a larger vocab
    torch.testing.assert_close(truncated["probs"], torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    _, model = bert_pair()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0, strategy="input"))
    with pytest.raises(ValueError, match="drops activations"):
        export_members(model, 2, tmp_path / "x", seed=0)
    _, model = bert_pair()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    with pytest.raises(ValueError, match="integer seed"):
        export_members(model, 2, tmp_path / "x", seed=None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError):
        export_members(model, 2, tmp_path / "full", seed=0)
    with pytest.raises(ValueError, match="call loradrop.apply_lora_dropout"):
        export_members(one_linear, 2, tmp_path / "y", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # a refused export leaves no temporary folder
