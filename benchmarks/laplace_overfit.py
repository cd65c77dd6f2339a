"""MAP vs Laplace-LoRA on the overfit tiny-BERT fixture of tests/app/test_laplace_baseline.py (same construction).

Run from the repository root, with laplace-torch importable:
    PYTHONPATH=<laplace-torch site> .venv/bin/python benchmarks/laplace_overfit.py
"""

import sys
import time

sys.path[:0] = ["tests", "tests/app"]

from test_laplace_baseline import _collate, make_overfit  # noqa: E402

from loradrop.app.laplace_baseline import fit_laplace, laplace_predict  # noqa: E402
from loradrop.calibration import classification_calibration  # noqa: E402

model, train, val, test, loss = make_overfit()
print(f"train loss {loss:.4f}")
for prior, v in (("val_nll", val), ("marglik", None)):
    t = time.perf_counter()
    fit = fit_laplace(model, train, v, _collate, batch_size=12, n_samples=200, prior=prior)
    out = laplace_predict(fit, test, _collate, batch_size=12, n_samples=200)
    maps, probs, labels = out.maps, out.probs, out.labels
    print(f"{prior}: prior precision {fit.prior_precision:.4g}, {fit.n_params} LoRA params, fit {fit.fit_s:.1f}s "
          f"tune {fit.tune_s:.1f}s total {time.perf_counter() - t:.1f}s")
    for name, p in (("MAP", maps), ("Laplace", probs)):
        m = classification_calibration(p, labels)
        print(f"  {name:8s} " + " ".join(f"{k} {v:.4f}" for k, v in m.items())
              + f" mean max-prob {float(p.max(-1).values.mean()):.4f}")
