"""Laplace-LoRA (Yang et al., ICLR 2024) as a post-hoc baseline on a trained plain-LoRA classifier, through the
maintained ``laplace-torch`` package (optional: ``pip install 'loradrop[laplace]'``).

What is fitted: a Kronecker-factored (KFAC, GGN) Laplace approximation over the LoRA factors only (every
``lora_A`` / ``lora_B`` weight; the base model and the classifier head stay at their trained values), with
laplace-torch's ``Laplace(..., subset_of_weights="all", hessian_structure="kron")`` on the train split.
Prior precision: one scalar, either the validation NLL of the predictive over a log grid (``"val_nll"``, used when the
data has a validation split distinct from the one scored) or laplace-torch's post-hoc marginal likelihood
(``"marglik"``). Predictive: the linearised (GLM) predictive, logits ~ N(f_MAP, J Σ Jᵀ), with the softmax averaged
over Monte-Carlo samples of the logits (as Laplace-LoRA's code does).

Tasks: sequence classification (the classifier's logits) and the letter-scored commonsense tasks (causal LM,
``loradrop.tasks.commonsense_scoring``): there the "classifier" is `_LetterLogits`, the answer letters' next-token
logits at the last prompt position, with a letter the question does not have held at the finite constant
`ABSENT_LOGIT` (``-inf``, as `LetterScorer` masks it, would make laplace-torch's loss and Jacobians NaN): a constant
has a zero Jacobian, so it adds nothing to the curvature or the predictive variance, and the predictive's softmax is
taken over the question's own letters only, so an absent choice gets probability exactly 0. Runs trained with
``choice_scoring="cloze"`` (``loradrop.tasks.cloze_scoring``) are scored the same way by `_ClozeLogits`: the
classifier's logits are the choices' log-likelihoods, from one LM row per choice. The predictive's Jacobians come
from `laplace_jacobians.hooked_jacobians` (one backward pass per batch in cloze form, one per class otherwise), with
laplace-torch's, one question at a time, as the fallback (`_moments`).

Only the app layer imports this module; the core never imports laplace-torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import UsageError
from .provenance import autocast_label
from .settings import LAPLACE_PRIORS as PRIOR_METHODS

GRID = tuple(10.0 ** (k / 2) for k in range(-8, 9))  # prior precisions 1e-4 .. 1e4, half a decade apart
ABSENT_LOGIT = -1e4  # the finite logit of a letter a question does not have (see the module docs)


def require_laplace() -> Any:
    """laplace-torch's ``Laplace`` factory, or one clear error saying how to install it."""
    try:
        from laplace import Laplace
    except ImportError as err:
        raise UsageError("the Laplace-LoRA baseline needs laplace-torch, which is not installed: "
                         "pip install 'loradrop[laplace]'") from err
    return Laplace


def letter_scored(spec: Any) -> bool:
    """Whether a task is scored by its answer letters' next-token logits (the commonsense multiple-choice tasks)."""
    return getattr(spec, "kind", None) == "causal_lm" and bool(getattr(spec, "predicts_classes", False))


def check_request(prior: Any, spec: Any, *, has_loradrop: bool, ood: bool = False, conformal: bool = False) -> None:
    """Refuse, before any model is loaded, what the baseline cannot do (one clear line each)."""
    if prior not in PRIOR_METHODS:
        raise UsageError(f"laplace={prior!r}: allowed {list(PRIOR_METHODS)}")
    if spec.kind != "classification" and not letter_scored(spec):
        raise UsageError(f"--laplace supports sequence-classification and letter-scored multiple-choice "
                         f"(commonsense) tasks; {spec.name} is {spec.kind}")
    if not getattr(spec, "trainable", True):
        raise UsageError(f"--laplace fits its posterior on the task's train split; {spec.name} is an evaluation "
                         "set only (score it as --ood-task of a run on a trainable task)")
    if has_loradrop:
        raise UsageError("--laplace is a baseline on a plain LoRA run's adapter (trained with --no-lora-dropout); "
                         "this adapter has LoRA Dropout")
    if conformal:
        raise UsageError("--laplace does not combine with --conformal-alpha")
    if ood and not letter_scored(spec):
        raise UsageError(f"--laplace combines with --ood-task only on letter-scored tasks (whose OOD sets the "
                         f"Laplace predictive scores); {spec.name} is {spec.kind}")
    require_laplace()


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class _Logits(torch.nn.Module):
    """A sequence classifier as laplace-torch wants it: a dict batch in, (batch, classes) logits out. The batch is
    moved to the model's device here (laplace-torch moves only the labels of a dict batch)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        device = _device(self.model)
        return self.model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.float()


class _ClozeLogits(torch.nn.Module):
    """A causal LM as a multiple-choice classifier in cloze form (`ClozeCollator(train=False)` batches): ``(batch,
    choices)`` logits, each choice's log-likelihood (`ClozeScorer`), absent choices at `ABSENT_LOGIT`.
    ``num_choices`` is a plain attribute, so an OOD set with another number of choices can swap it."""

    def __init__(self, model: torch.nn.Module, num_choices: int, per_token: bool = False) -> None:
        super().__init__()
        self.model = model
        self.num_choices = int(num_choices)
        self.per_token = per_token

    def forward(self, batch: Any) -> torch.Tensor:
        from ..tasks.cloze_scoring import ClozeScorer

        device = _device(self.model)
        keys = ("input_ids", "attention_mask", "position_ids", "choice_mask", "cont_targets", "row_slots")
        scorer = ClozeScorer(self.model, self.num_choices, self.per_token)
        logits = scorer(**{k: batch[k].to(device) for k in keys}).logits.float()
        return logits.masked_fill(~batch["choice_mask"].to(device).bool(), ABSENT_LOGIT)


def _form(data: Any) -> tuple[str, dict[str, Any]]:
    """How a task's predictions are scored: ``("letters", {"letter_ids": ...})``, ``("cloze", {"num_choices":
    ...})`` or ``("classifier", {})``."""
    if "letter_ids" in data.extras:
        return "letters", {"letter_ids": data.extras["letter_ids"]}
    if "num_choices" in data.extras:
        return "cloze", {"num_choices": data.extras["num_choices"], "per_token": data.extras["per_token"]}
    return "classifier", {}


class _LetterLogits(torch.nn.Module):
    """A causal LM as a multiple-choice classifier laplace-torch can differentiate: a letter-scoring batch
    (`ChoiceCollator(train=False)`: ``input_ids``, ``attention_mask``, ``position_ids``, ``choice_mask``) in,
    ``(batch, letters)`` logits out, finite everywhere (absent letters at `ABSENT_LOGIT`).

    The scoring itself is `LetterScorer`'s, built per call around the LM (cheap) rather than once: its letter ids
    are a buffer, and laplace-torch's Jacobians (``functional_call``) pass the buffers it saw at fit time, so an OOD
    set with another number of letters (ARC's five after OpenBookQA's four) could not swap them. Here the ids are a
    plain attribute (`letters`), and the LM's parameters are the ones ``functional_call`` substitutes."""

    def __init__(self, model: torch.nn.Module, letter_ids: Any) -> None:
        super().__init__()
        self.model = model
        self.letter_ids = tuple(int(i) for i in letter_ids)

    def forward(self, batch: Any) -> torch.Tensor:
        from ..tasks.commonsense_scoring import LetterScorer

        device = _device(self.model)
        scorer = LetterScorer(self.model, self.letter_ids)
        logits = scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                        batch["position_ids"].to(device)).logits.float()
        return logits.masked_fill(~batch["choice_mask"].to(device).bool(), ABSENT_LOGIT)


@dataclass
class LaplaceFit:
    """A fitted Laplace-LoRA posterior: the laplace-torch object, the prior precision chosen and how."""

    la: Any
    prior_precision: float
    prior_method: str
    n_params: int
    fit_s: float
    tune_s: float
    map_autocast: torch.dtype | None = None  # the MAP logits' autocast dtype (`_moments`)


@dataclass
class LaplacePredictions:
    """Per-example MAP and Laplace predictive probabilities ``(n, classes)``, the predictive's mutual information
    (between the prediction and the sampled logits: entropy of the mean minus mean entropy), and the labels."""

    maps: torch.Tensor
    probs: torch.Tensor
    mutual_information: torch.Tensor
    labels: torch.Tensor


def lora_parameters_only(model: torch.nn.Module) -> int:
    """Make exactly the LoRA factors trainable (the Laplace posterior's parameters); their number."""
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
        count += param.numel() if param.requires_grad else 0
    if count == 0:
        raise UsageError("the Laplace-LoRA baseline needs a LoRA adapter; the model has no lora_A / lora_B weights")
    return count


def _loader(dataset: Any, collator: Any, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator)


JACOBIAN_ROWS = 1  # examples per Jacobian call (see `_moments`)
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _rows(batch: Any, start: int, stop: int) -> dict[str, Any]:
    """Examples `start:stop` of a collated batch, without the padding columns none of them uses (a cloze batch:
    those questions' choice rows, their slots renumbered, their continuation columns)."""
    if "row_slots" in batch:
        from ..tasks.commonsense_scoring import IGNORE_INDEX

        k = batch["choice_mask"].shape[1]
        keep = (batch["row_slots"] >= start * k) & (batch["row_slots"] < stop * k)
        part = {key: batch[key][keep] for key in ("input_ids", "attention_mask", "position_ids", "cont_targets")}
        part.update(row_slots=batch["row_slots"][keep] - start * k, choice_mask=batch["choice_mask"][start:stop],
                    labels=batch["labels"][start:stop])
        part["cont_targets"] = part["cont_targets"][:, part["cont_targets"].ne(IGNORE_INDEX).any(0)]
    else:
        part = {k: v[start:stop] for k, v in batch.items()}
    mask = part.get("attention_mask")
    if mask is not None and mask.dim() == 2 and not bool(mask.bool().all()):
        used = mask.bool().any(0)
        part.update({k: part[k][:, used] for k in SEQUENCE_KEYS
                     if k in part and part[k].dim() == 2 and part[k].shape[1] == used.shape[0]})
    return part


def _moments(la: Any, batch: Any, map_autocast: torch.dtype | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(Jacobians, MAP logits, present classes or None) of one batch: computed once and reused for every prior
    precision (laplace-torch's gridsearch would recompute the Jacobians at every grid point). ``present`` is the
    letter-scoring batch's ``choice_mask``.

    The Jacobians are taken `JACOBIAN_ROWS` examples at a time: laplace-torch's ``jacrev`` differentiates the whole
    ``(batch, C)`` output, i.e. batch·C backward passes each through the whole batch, so its work and memory grow
    with the square of the batch (a batch of 8 SmolLM2 prompts ran a 23 GB CPU machine out of memory); one example
    at a time is C passes through that example alone (the Jacobians are the same: examples are independent).
    Faster still, and used whenever it applies (every LoRA run here): `laplace_jacobians.hooked_jacobians`, per-row
    gradients of the LoRA factors from one backward pass per class over the whole batch (cloze: one pass).

    `map_autocast`: the MAP logits come from one more forward pass under autocast to this dtype, as the trained
    run's own evaluation scored them (the Trainer's mixed precision leaves the model's forward under autocast), so
    the MAP is the LoRA run's single pass and the predictive differs from it by the posterior alone; the Jacobians,
    like the KFAC fit, stay in float32."""
    from .laplace_jacobians import hooked_jacobians

    hooked = hooked_jacobians(la.model, batch)
    if hooked is not None:
        js, f_mu = hooked
    else:
        n = len(batch["labels"])
        parts = [la.backend.jacobians(_rows(batch, i, i + JACOBIAN_ROWS)) for i in range(0, n, JACOBIAN_ROWS)]
        js, f_mu = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if map_autocast is not None:
        with torch.no_grad(), torch.autocast(f_mu.device.type, dtype=map_autocast):
            f_mu = la.model(batch).float()
    present = batch.get("choice_mask")
    return js, f_mu, (present.to(f_mu.device).bool() if present is not None else None)


def _map_probs(f_mu: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    return (f_mu if present is None else f_mu.masked_fill(~present, float("-inf"))).softmax(-1)


def _covariance_root(f_var: torch.Tensor) -> torch.Tensor:
    """A square root S (S S^T = f_var) of each (C, C) covariance in a batch: its Cholesky factor (with a 1e-6 jitter)
    where that exists, else V sqrt(L) from the eigendecomposition V L V^T in float64, negative eigenvalues (rounding)
    clamped to 0. A GLM covariance of low rank and large scale (a weak prior) fails float32 Cholesky, as one ARC-C
    question did on the H200 (2026-12-04): one such question must not lose the whole fit. The Cholesky path is kept
    where it works, so fits that never needed the fallback draw exactly as before."""
    jitter = 1e-6 * torch.eye(f_var.shape[-1], dtype=f_var.dtype, device=f_var.device)
    scale, info = torch.linalg.cholesky_ex(f_var + jitter)
    failed = info > 0
    if failed.any():
        bad = f_var[failed].double()
        values, vectors = torch.linalg.eigh((bad + bad.mT) / 2)
        scale[failed] = (vectors * values.clamp_min(0.0).sqrt()[..., None, :]).to(scale.dtype)
    return scale


def _predictive(f_mu: torch.Tensor, f_var: torch.Tensor, n_samples: int, generator: torch.Generator,
                present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The GLM predictive's class probabilities and mutual information: the softmax (over the `present` classes
    only, when given: an absent choice gets exactly 0) averaged over `n_samples` draws of the logits from
    N(f_mu, f_var) (f_var: (batch, C, C)). Hand-written (a few lines) so the draws are seeded and reused across the
    grid; laplace-torch's own MC link draws from the global generator."""
    from ..ensemble import entropy

    scale = _covariance_root(f_var)
    eps = torch.randn((n_samples, *f_mu.shape), generator=generator, dtype=f_mu.dtype).to(f_mu.device)
    logits = f_mu + torch.einsum("bij,sbj->sbi", scale, eps)
    if present is not None:
        logits = logits.masked_fill(~present, float("-inf"))
    samples = logits.softmax(-1)
    probs = samples.mean(0)
    information = entropy(probs.double()) - entropy(samples.double()).mean(0)
    return probs, information.clamp_min(0.0)


def fit_laplace(model: torch.nn.Module, train: Any, validation: Any | None, collator: Any, *, batch_size: int = 16,
                prior: str = "auto", n_samples: int = 1000, seed: int = 0,
                letter_ids: Any = None, num_choices: int | None = None, per_token: bool = False,
                map_autocast: torch.dtype | None = None) -> LaplaceFit:
    """Fit KFAC Laplace over `model`'s LoRA factors on `train` and tune its prior precision (`prior`: ``"val_nll"``
    on `validation`, ``"marglik"``, or ``"auto"``: val_nll when `validation` is given, else marglik). With
    `letter_ids`, `model` is a causal LM scored by those answer letters (`_LetterLogits`; `collator`: the
    evaluation `ChoiceCollator`); with `num_choices`, a causal LM in cloze form (`_ClozeLogits`, the evaluation
    `ClozeCollator`); else a sequence classifier. `map_autocast`: see `_moments`."""
    import time

    Laplace = require_laplace()
    if prior not in PRIOR_METHODS:
        raise UsageError(f"prior {prior!r}: allowed {list(PRIOR_METHODS)}")
    method = ("val_nll" if validation is not None else "marglik") if prior == "auto" else prior
    if method == "val_nll" and validation is None:
        raise UsageError("prior 'val_nll' needs a validation split distinct from the evaluation split")
    model.eval()
    n_params = lora_parameters_only(model)
    net = (_LetterLogits(model, letter_ids) if letter_ids is not None else
           _ClozeLogits(model, num_choices, per_token) if num_choices is not None else _Logits(model))
    # laplace-torch counts a dict batch's examples by its `dict_key_x` entry: a cloze batch has one row per choice in
    # input_ids, but one choice_mask row per question (the examples the loss terms belong to)
    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="kron",
                 dict_key_x="choice_mask" if num_choices is not None else "input_ids")
    start = time.perf_counter()
    try:
        la.fit(_loader(train, collator, batch_size))
    except SystemExit as err:  # laplace-torch calls exit() when a Kronecker factor's eigendecomposition fails twice:
        # in a sweep's pool worker that would end the process and leave its job unanswered, hanging the sweep
        raise RuntimeError("laplace-torch gave up: the eigendecomposition of a Kronecker factor did not converge, "
                           "even with jitter") from err
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    if method == "marglik":
        la.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar")
        chosen = float(la.prior_precision)
    else:
        nll = torch.zeros(len(GRID), dtype=torch.float64)
        for i, batch in enumerate(_loader(validation, collator, batch_size)):
            js, f_mu, present = _moments(la, batch, map_autocast)
            labels = batch["labels"].to(f_mu.device)
            for g, precision in enumerate(GRID):
                la.prior_precision = precision
                probs, _ = _predictive(f_mu, la.functional_variance(js), n_samples,
                                       torch.Generator().manual_seed(seed + i), present)
                nll[g] += -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum().item()
        chosen = GRID[int(nll.argmin())]
        la.prior_precision = chosen
    return LaplaceFit(la=la, prior_precision=chosen, prior_method=method, n_params=n_params, fit_s=fit_s,
                      tune_s=time.perf_counter() - start, map_autocast=map_autocast)


def laplace_predict(fit: LaplaceFit, dataset: Any, collator: Any, *, batch_size: int = 16, n_samples: int = 1000,
                    seed: int = 0, letter_ids: Any = None, num_choices: int | None = None,
                    per_token: bool | None = None) -> LaplacePredictions:
    """MAP and Laplace predictive probabilities over a tokenized split. `letter_ids` (letter-scored fits) or
    `num_choices` and `per_token` (cloze fits): the split's own scoring, set on the fitted scorer for this call
    (an OOD set's letters or number of choices differ from the fitted task's)."""
    la = fit.la
    net = la.model
    split_scoring = {name: value for name, value in (
        ("letter_ids", None if letter_ids is None else tuple(int(i) for i in letter_ids)),
        ("num_choices", None if num_choices is None else int(num_choices)), ("per_token", per_token))
        if value is not None}
    for name in split_scoring:
        if not hasattr(net, name):
            raise UsageError(f"{name} is for a Laplace fit of a "
                             f"{'letter' if name == 'letter_ids' else 'cloze'}-scored (causal LM) task")
    fitted = {name: getattr(net, name) for name in split_scoring}
    maps, probs, information, labels = [], [], [], []
    try:
        for name, value in split_scoring.items():
            setattr(net, name, value)
        for i, batch in enumerate(_loader(dataset, collator, batch_size)):
            js, f_mu, present = _moments(la, batch, fit.map_autocast)
            maps.append(_map_probs(f_mu, present).cpu())
            mean, mi = _predictive(f_mu, la.functional_variance(js), n_samples,
                                   torch.Generator().manual_seed(10_007 + seed + i), present)
            probs.append(mean.cpu())
            information.append(mi.cpu())
            labels.append(batch["labels"])
    finally:
        for name, value in fitted.items():
            setattr(net, name, value)
    return LaplacePredictions(torch.cat(maps), torch.cat(probs), torch.cat(information), torch.cat(labels))


def score_laplace(fit: LaplaceFit, data: Any, *, batch_size: int = 16, n_samples: int = 1000, seed: int = 0,
                  ) -> Any:
    """An `EvalResult` of `data`'s evaluation split (the fitted task's, or an OOD set's prepared the same way):
    ``single`` the MAP, ``ensemble`` the Laplace predictive, each with the task's metrics plus ECE / NLL / Brier,
    and one prediction row per example in the rows' usual layout (ids, probabilities, entropy, mutual
    information), so selective prediction and OOD detection read them as any ensemble's."""
    from ..tasks.classification import class_prediction_fields, classification_metrics
    from ..tasks.spec import EvalResult

    spec = data.spec
    form, scoring = _form(data)
    collator = data.extras["eval_collator"] if form != "classifier" else data.collator
    out = laplace_predict(fit, data.extras["encoded"][data.eval_split], collator, batch_size=batch_size,
                          n_samples=n_samples, seed=seed, **scoring)
    raw = data.raw[data.eval_split]
    ids = list(raw["idx"]) if "idx" in raw.column_names else list(range(len(raw)))
    rows = [{"index": i, "id": ids[i], "label": int(out.labels[i]),
             **class_prediction_fields(out.maps[i], out.probs[i], out.mutual_information[i])}
            for i in range(len(out.labels))]
    return EvalResult(single=classification_metrics(spec, out.maps, out.labels),
                      ensemble={**classification_metrics(spec, out.probs, out.labels), "ensemble_size": n_samples},
                      rows=rows)


def evaluate_laplace(model: torch.nn.Module, data: Any, *, prior: str = "auto", batch_size: int = 16,
                     n_samples: int = 1000, seed: int = 0, map_autocast: torch.dtype | None = None,
                     ) -> tuple[Any, dict[str, Any], LaplaceFit]:
    """Fit on `data.train`, tune on its validation split (when distinct from the evaluation split), score the
    evaluation split (`score_laplace`): the `EvalResult`, the ``laplace`` section (prior, sizes, seconds) and the
    fit (to score OOD sets with `score_laplace`). `map_autocast`: see `_moments`."""
    import time

    spec = data.spec
    form, scoring = _form(data)
    if (spec.kind != "classification" and not letter_scored(spec)) or data.train is None:
        raise UsageError(f"the Laplace-LoRA baseline supports sequence-classification and letter-scored tasks "
                         f"with a train split; {spec.name} is {spec.kind}")
    validation = data.eval_loss if data.eval_split != "validation" else None  # never tune on the scored split
    collator = data.extras["eval_collator"] if form != "classifier" else data.collator
    fit = fit_laplace(model, data.train, validation, collator, batch_size=batch_size, prior=prior,
                      n_samples=n_samples, seed=seed, map_autocast=map_autocast, **scoring)
    start = time.perf_counter()
    result = score_laplace(fit, data, batch_size=batch_size, n_samples=n_samples, seed=seed)
    section = {"structure": "kron", "weights": "lora_A and lora_B only", "predictive": "glm, mc softmax",
               "scored_by": {"letters": "answer letters' next-token logits (absent letters: probability 0)",
                             "cloze": "each choice's log-likelihood (absent choices: probability 0)",
                             "classifier": "the classifier's logits"}[form],
               "map_autocast": autocast_label(map_autocast, _device(model).type),
               "n_samples": n_samples, "prior_method": fit.prior_method, "prior_precision": fit.prior_precision,
               "n_params": fit.n_params, "n_train": len(data.train), "fit_s": fit.fit_s, "tune_s": fit.tune_s,
               "predict_s": time.perf_counter() - start}
    return result, section, fit
