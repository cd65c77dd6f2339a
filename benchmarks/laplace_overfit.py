"""MAP vs Laplace-LoRA on the overfit tiny-BERT fixture of tests/app/test_laplace_baseline.py (same construction).

Run from the repository root, with laplace-torch importable:
    PYTHONPATH=<laplace-torch site> .venv/bin/python benchmarks/laplace_overfit.py
"""

import sys
import time

sys.path[:0] = ["tests", "tests/app"]

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from test_laplace_baseline import _collate, _rows  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

from helpers import lora_config, tiny_bert_config  # noqa: E402
from loradrop.app.laplace_baseline import fit_laplace, laplace_predict  # noqa: E402
from loradrop.calibration import classification_calibration  # noqa: E402

torch.manual_seed(0)
config = tiny_bert_config(initializer_range=0.5)
model = get_peft_model(BertForSequenceClassification(config),
                       lora_config(target_modules=["query", "value", "dense"], task_type="SEQ_CLS"))
g = torch.Generator().manual_seed(1)
train, val, test = (_rows(n, g, config.vocab_size) for n in (24, 24, 48))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for _ in range(30):
    loss = model(**_collate(train)).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
model.eval()
print(f"train loss {float(loss.detach()):.4f}")
for prior, v in (("val_nll", val), ("marglik", None)):
    t = time.perf_counter()
    fit = fit_laplace(model, train, v, _collate, batch_size=12, n_samples=200, prior=prior)
    maps, probs, labels = laplace_predict(fit, test, _collate, batch_size=12, n_samples=200)
    print(f"{prior}: prior precision {fit.prior_precision:.4g}, {fit.n_params} LoRA params, fit {fit.fit_s:.1f}s "
          f"tune {fit.tune_s:.1f}s total {time.perf_counter() - t:.1f}s")
    for name, p in (("MAP", maps), ("Laplace", probs)):
        m = classification_calibration(p, labels)
        print(f"  {name:8s} " + " ".join(f"{k} {v:.4f}" for k, v in m.items())
              + f" mean max-prob {float(p.max(-1).values.mean()):.4f}")
