"""Regression tests of issue #12 (core library): the expectation with ``lora_bias``, LoRA Dropout on a model whose
adapters change after apply, input validation of the ensemble entry points, automatic ensemble chunking.

(Config immutability is in test_config.py, its property-based tests in test_config_properties.py, the Trainer's
non-finite loss check in test_training.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import loradrop
from loradrop import STRATEGIES, LoraDropoutConfig, split_members

IN, OUT, RANK = 12, 10, 4


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def bias_model(**config) -> PeftModel:
    """One adapted projection with PEFT's ``lora_bias=True`` (a bias on lora_B) and a large, non-zero bias."""
    torch.manual_seed(0)
    model = get_peft_model(Head(), LoraConfig(r=RANK, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0,
                                              init_lora_weights=False, lora_bias=True))
    with torch.no_grad():
        model.base_model.model.proj.lora_B["default"].bias.copy_(2 * torch.randn(OUT))
    return loradrop.apply_lora_dropout(model, LoraDropoutConfig(**{"p": 0.5, "seed": 3, **config}))


def fresh_base() -> Head:
    torch.manual_seed(0)
    return Head()


X = torch.randn(3, IN, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ 1. lora_bias
# PEFT warns that a 1-d lora_B.bias might be an unsharded ZeRO-3 tensor when saving; here it is just lora_bias.
bias_save_warning = pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")

@bias_save_warning
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_bias_expectation_equals_the_mean_of_members(strategy, rescale, tmp_path):
    """The eval forward ("expected"), the exported adapter and PEFT's merge all equal the mean of 20,000 masked
    members, also for the bias of lora_B (dropped with its row of B by "ab"/"b", never by "a"/"rank"/"input")."""
    model = bias_model(strategy=strategy, rescale=rescale)
    ctl = loradrop.get_controller(model)
    n = 20_000
    model.eval()
    with torch.no_grad():
        expected = model(X)
        with ctl.ensemble(ctl.ensemble_key(5), n, 0):
            members = split_members(model(X), n)  # (n, 3, OUT)
    mean, stderr = members.mean(0), members.std(0) / n**0.5
    assert stderr.max() > 0 or strategy == "input"  # the members differ (the check is not vacuous)
    assert ((mean - expected).abs() <= 5 * stderr + 1e-4).all(), (mean - expected).abs().max()

    loradrop.export_adapter(model, tmp_path / "adapter")
    exported = PeftModel.from_pretrained(fresh_base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(X), expected, atol=1e-5, rtol=1e-5)

    merged = copy.deepcopy(model)  # PEFT's merge through the variant (lora_B's bias goes into the base bias)
    base = merged.base_model.model.proj.base_layer
    before = base.weight.detach().clone(), base.bias.detach().clone()
    merged.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(merged(X), expected, atol=1e-5, rtol=1e-5)
    merged.unmerge_adapter()
    torch.testing.assert_close(base.weight, before[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(base.bias, before[1], atol=1e-6, rtol=0)


@bias_save_warning
def test_lora_bias_merged_export_of_a_transformers_model(tiny_bert, tmp_path):
    from transformers import BertForSequenceClassification

    from helpers import lora_config, tiny_bert_config

    torch.manual_seed(0)
    peft_model = get_peft_model(BertForSequenceClassification(tiny_bert_config()),
                                lora_config(target_modules=["query", "value"], lora_bias=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                param.copy_(torch.randn(param.shape))
    model = loradrop.apply_lora_dropout(peft_model, LoraDropoutConfig(p=0.5, seed=0))
    batch = {"input_ids": torch.randint(0, 120, (3, 7), generator=torch.Generator().manual_seed(2))}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    loradrop.export_adapter(model, tmp_path / "merged", merge=True)
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-4)


def test_lora_bias_raw_mode_is_the_full_update():
    model = bias_model(strategy="ab")
    plain = copy.deepcopy(model)
    loradrop.remove_lora_dropout(plain)
    loradrop.set_eval_mode(model, "raw")
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), plain(X))


# ------------------------------------------------------------------------------------------------ 2. adapters change
INPUTS = {"input_ids": torch.randint(0, 120, (4, 10), generator=torch.Generator().manual_seed(1))}


def two_adapter_bert(tiny_bert) -> PeftModel:
    from helpers import lora_config

    model = tiny_bert()
    model.add_adapter("other", lora_config(target_modules=["query", "value"]))
    return loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))


def test_apply_refuses_a_merged_adapter(tiny_bert):
    model = tiny_bert()
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"has adapter\(s\) \['default'\] merged into its base weights \(merge_adapter"
                                         r"\(\)\); .* call model.unmerge_adapter\(\) before apply_lora_dropout"):
        loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    assert loradrop.model._find_controller(model) is None  # nothing was changed
    model.unmerge_adapter()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    assert loradrop.ensemble_predict(model, INPUTS, 4, seed=0).mutual_information.max() > 0


def test_switching_to_an_adapter_without_lora_dropout_warns_and_ensembles_refuse(tiny_bert):
    from loradrop.errors import UsageError

    model = two_adapter_bert(tiny_bert)
    with pytest.warns(UserWarning, match=r"LoRA Dropout stops acting: the active adapter is \['other'\] while LoRA "
                                         r"Dropout was applied to \['default'\]"):
        model.set_adapter("other")
    message = (r"loradrop: ensemble_predict needs LoRA Dropout's masks, but the active adapter is \['other'\] while "
               r"LoRA Dropout was applied to \['default'\]: .* call model.set_adapter\('default'\) first")
    with pytest.raises(UsageError, match=message):
        loradrop.ensemble_predict(model, INPUTS, 4, seed=0)
    with pytest.raises(ValueError, match="ensemble_score_choices needs LoRA Dropout's masks"):
        loradrop.ensemble_score_choices(model, INPUTS["input_ids"], [1, 2], 4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.set_adapter("default")  # back: no warning, and the members differ again
    assert loradrop.ensemble_predict(model, INPUTS, 4, seed=0).mutual_information.max() > 0


def test_an_adapter_added_after_apply_warns_naming_it(tiny_bert):
    from helpers import lora_config

    model = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5, seed=0))
    with pytest.warns(UserWarning, match=r"adapter 'late' was added after apply_lora_dropout and has no LoRA Dropout "
                                         r"masks \(they act on \['default'\] only\)"):
        model.add_adapter("late", lora_config(target_modules=["query", "value"]))  # query alone: ~1e-6 effect
    assert loradrop.ensemble_predict(model, INPUTS, 4, seed=0).mutual_information.max() > 0  # default still masked
    with pytest.warns(UserWarning, match="stops acting"):
        model.set_adapter("late")
    with pytest.raises(ValueError, match="needs LoRA Dropout's masks"):
        loradrop.ensemble_predict(model, INPUTS, 4, seed=0)
    loradrop.remove_lora_dropout(model)  # the documented way: apply again to the new adapter
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0), adapter_name="late")
    assert loradrop.ensemble_predict(model, INPUTS, 4, seed=0).mutual_information.max() > 0
    assert "set_adapter" not in vars(loradrop.remove_lora_dropout(model))  # the wrappers go with it


def test_merged_or_disabled_adapters_make_ensembles_refuse(tiny_bert):
    model = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5, seed=0))
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"adapter 'default' is merged into the base weights \(merge_adapter\(\)\): "
                                         r"merged layers run the expected update without masks; call "
                                         r"model.unmerge_adapter\(\) first"):
        loradrop.ensemble_predict(model, INPUTS, 4, seed=0)
    model.unmerge_adapter()
    with model.disable_adapter(), pytest.raises(ValueError, match=r"the adapters are disabled \(inside "
                                                                  r"model.disable_adapter\(\)\)"):
        loradrop.ensemble_predict(model, INPUTS, 4, seed=0)
    assert loradrop.ensemble_predict(model, INPUTS, 4, seed=0).mutual_information.max() > 0


def test_apply_to_an_inactive_adapter_warns_and_training_says_so(tiny_bert):
    from transformers import TrainerControl, TrainerState

    from loradrop.training import LoraDropoutCallback, build_training_args

    model = tiny_bert()
    from helpers import lora_config

    model.add_adapter("other", lora_config(target_modules=["query", "value"]))
    with pytest.warns(UserWarning, match=r"LoRA Dropout is applied but does not act now: the active adapter is "
                                         r"\['default'\] while LoRA Dropout was applied to \['other'\]"):
        loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, samples=2, member_chunk=1, seed=0),
                                    adapter_name="other")
    with pytest.warns(UserWarning, match="loradrop: training without LoRA Dropout: the active adapter"):
        LoraDropoutCallback().on_train_begin(build_training_args("unused", progress=False), TrainerState(),
                                             TrainerControl(), model=model)
    model.train()
    with pytest.raises(ValueError, match="chunked_backward needs LoRA Dropout's masks"):
        loradrop.chunked_backward(model, {**INPUTS, "labels": torch.zeros(4, dtype=torch.long)})


# ------------------------------------------------------------------------------------------------ 4. sampling values
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": float("nan")}, "temperature must be a finite number > 0, got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number > 0, got inf"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
    ({"temperature": -1}, "temperature must be a finite number > 0, got -1"),
    ({"temperature": "1"}, "temperature must be a finite number > 0, got '1'"),
    ({"temperature": True}, "temperature must be a finite number > 0, got True"),
    ({"top_p": float("nan")}, "top_p must be a number in (0, 1], got nan"),
    ({"top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be a number in (0, 1], got 1.5"),
    ({"top_p": None}, "top_p must be a number in (0, 1], got None"),
])
def test_ensemble_generate_refuses_bad_sampling_values(tiny_llama, kwargs, message):
    model = loradrop.apply_lora_dropout(tiny_llama(), LoraDropoutConfig(p=0.5, seed=0))
    prompt = torch.tensor([[1, 5, 7]])
    with pytest.raises(ValueError) as err:
        loradrop.ensemble_generate(model, prompt, 2, 3, do_sample=True, **kwargs)
    assert str(err.value) == message


# ------------------------------------------------------------------------------------------------ 5. automatic chunks
def calls_of(model: PeftModel) -> tuple[list[int], object]:
    sizes: list[int] = []
    hook = model.get_base_model().register_forward_hook(lambda mod, args, out: sizes.append(out.logits.shape[0]))
    return sizes, hook


def test_ensemble_chunks_itself_when_memory_is_short(tiny_bert, monkeypatch):
    """With little "available memory" ensemble_predict runs as many members per call as fit, and the result is the
    one of the same explicit chunk_size (bit for bit) and of the unchunked run."""
    from loradrop import ensemble as ens

    model = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5, seed=0))
    per_member = ens.member_bytes(model, INPUTS)
    assert per_member > 0
    whole = loradrop.ensemble_predict(model, INPUTS, 10, seed=4, chunk_size=10)
    explicit = loradrop.ensemble_predict(model, INPUTS, 10, seed=4, chunk_size=3)

    monkeypatch.setattr(ens, "available_memory", lambda device: int(3.5 * per_member / ens.MEMORY_FRACTION))
    assert ens.auto_chunk_size(model, INPUTS, 10) == 3
    sizes, hook = calls_of(model)
    auto = loradrop.ensemble_predict(model, INPUTS, 10, seed=4)
    hook.remove()
    assert sizes == [12, 12, 12, 4]  # 3, 3, 3 and 1 members of 4 rows
    assert torch.equal(auto.member_probs, explicit.member_probs)
    torch.testing.assert_close(auto.member_probs, whole.member_probs, atol=1e-6, rtol=1e-5)

    monkeypatch.setattr(ens, "available_memory", lambda device: 1)  # less than one member: one at a time
    sizes, hook = calls_of(model)
    torch.testing.assert_close(loradrop.ensemble_predict(model, INPUTS, 3, seed=4).member_probs,
                               whole.member_probs[:3], atol=1e-6, rtol=1e-5)
    hook.remove()
    assert sizes == [4, 4, 4]

    monkeypatch.setattr(ens, "available_memory", lambda device: None)  # unknown: one call, as before
    assert ens.auto_chunk_size(model, INPUTS, 1000) == 1000


def test_plenty_of_memory_keeps_one_call_and_choices_chunk_too(tiny_llama, monkeypatch):
    from loradrop import ensemble as ens

    model = loradrop.apply_lora_dropout(tiny_llama(), LoraDropoutConfig(p=0.5, seed=0))
    prompt = {"input_ids": torch.tensor([[1, 5, 7, 9], [1, 4, 4, 8]])}
    sizes, hook = calls_of(model)
    whole = loradrop.ensemble_score_choices(model, prompt["input_ids"], [5, 6, 7], 6, seed=1)
    assert sizes == [12]  # a real machine has room for 6 tiny members: one call
    per_member = ens.member_bytes(model, prompt)
    monkeypatch.setattr(ens, "available_memory", lambda device: int(2 * per_member / ens.MEMORY_FRACTION))
    sizes.clear()
    auto = loradrop.ensemble_score_choices(model, prompt["input_ids"], [5, 6, 7], 6, seed=1)
    hook.remove()
    assert sizes == [4, 4, 4]
    torch.testing.assert_close(auto.member_probs, whole.member_probs, atol=1e-6, rtol=1e-5)


def test_member_estimate_counts_masks_and_the_widest_activation(tiny_bert, tiny_llama):
    from loradrop import ensemble as ens

    bert = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5, seed=0))
    ctl = loradrop.get_controller(bert)
    # tiny BERT: 40 tokens, widest activation intermediate_size=64, float32
    assert ens.member_bytes(bert, INPUTS) == 40 * 64 * 4 * ens.ACTIVATION_WIDTHS + ctl.num_features * ens.MASK_BYTES
    llama = loradrop.apply_lora_dropout(tiny_llama(), LoraDropoutConfig(p=0.5, seed=0))
    # tiny Llama: the LM head's 96 logits per token are the widest
    assert ens.member_bytes(llama, {"input_ids": torch.ones(2, 5, dtype=torch.long)}) == (
        10 * 96 * 4 * ens.ACTIVATION_WIDTHS + loradrop.get_controller(llama).num_features * ens.MASK_BYTES)


def test_available_memory_on_cpu_with_and_without_psutil(monkeypatch):
    import sys

    from loradrop.ensemble import available_memory

    with_psutil = available_memory(torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    from_proc = available_memory(torch.device("cpu"))
    assert with_psutil is None or with_psutil > 0
    assert from_proc is None or from_proc > 0
    assert with_psutil is not None or from_proc is not None  # Linux CI has one of them
    assert available_memory(torch.device("meta")) is None


def test_cuda_memory_budget_caps_what_the_chunks_count_as_free(monkeypatch):
    """Processes sharing a GPU: the automatic chunks are sized from what this process's budget leaves, not from the
    whole card's free memory; the budget is restored on exit, and bad budgets are refused."""
    from loradrop import ensemble as ens

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gib)
    cuda = torch.device("cuda", 0)
    assert ens.available_memory(cuda) == 62 * gib  # the card's free memory and the cache's unused 2 GiB
    with loradrop.cuda_memory_budget(10 * gib):
        assert ens.available_memory(cuda) == 7 * gib  # 10 GiB less the 3 allocated
        with ens.cuda_memory_budget(2 * gib):
            assert ens.available_memory(cuda) == 0  # already over: one member at a time
        assert ens.available_memory(cuda) == 7 * gib
        with ens.cuda_memory_budget(None):
            assert ens.available_memory(cuda) == 62 * gib
    with ens.cuda_memory_budget(100 * gib):
        assert ens.available_memory(cuda) == 62 * gib  # the card's free memory is still the limit
    assert ens._CUDA_BUDGET is None and ens.available_memory(cuda) == 62 * gib
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="nbytes must be None or an integer >= 0"), ens.cuda_memory_budget(bad):
            pass
    assert ens._CUDA_BUDGET is None


def test_out_of_memory_halves_the_automatic_chunk(tiny_bert, monkeypatch):
    """On a CUDA out-of-memory error the automatic chunking retries the same members, fewer at a time."""
    from loradrop import ensemble as ens

    model = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5, seed=0))
    whole = loradrop.ensemble_predict(model, INPUTS, 8, seed=2, chunk_size=8)
    monkeypatch.setattr(ens, "_model_device", lambda model: torch.device("cuda"))  # the CUDA branch, on the CPU
    monkeypatch.setattr(ens, "_model_inputs", lambda model, batch: dict(batch))  # (inputs stay where they are)
    monkeypatch.setattr(ens, "auto_chunk_size", lambda model, inputs, n: n)
    fake_cuda = {"memory_allocated": lambda d: 0, "max_memory_allocated": lambda d: 0, "empty_cache": lambda: None}
    for name, fn in fake_cuda.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    sizes: list[int] = []

    def oom_above_2(mod, args, kwargs):
        rows = kwargs["input_ids"].shape[0]
        if rows > 2 * 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        sizes.append(rows // 4)

    hook = model.get_base_model().register_forward_pre_hook(oom_above_2, with_kwargs=True)
    out = loradrop.ensemble_predict(model, INPUTS, 8, seed=2)
    hook.remove()
    assert sizes == [2, 2, 2, 2]
    torch.testing.assert_close(out.member_probs, whole.member_probs, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_automatic_chunks_measure_and_equal_explicit_chunks(tiny_bert, monkeypatch):
    from loradrop import ensemble as ens

    model = loradrop.apply_lora_dropout(tiny_bert().cuda(), LoraDropoutConfig(p=0.5, seed=0))
    assert ens.available_memory(torch.device("cuda")) > 0
    whole = loradrop.ensemble_predict(model, INPUTS, 64, seed=4, chunk_size=64)
    per_member = ens.member_bytes(model, INPUTS)
    monkeypatch.setattr(ens, "available_memory", lambda device: int(8 * per_member / ens.MEMORY_FRACTION))
    sizes, hook = calls_of(model)
    auto = loradrop.ensemble_predict(model, INPUTS, 64, seed=4)
    hook.remove()
    assert sizes[0] == 8 * 4 and sum(sizes) == 64 * 4  # the first chunk from the estimate, the rest measured
    torch.testing.assert_close(auto.member_probs, whole.member_probs, atol=1e-5, rtol=1e-4)
