"""Run PEFT's own test suite with LoRA Dropout attached at p = 0 to every LoRA model it builds (issue #13).

PEFT's tests are not copied into this repository. They come from the PyPI source distribution of the PEFT version
that is installed (``pip download peft==<version> --no-binary :all:``; it ships ``tests/``), or from a folder given
with ``--tests-dir`` (e.g. a checkout of github.com/huggingface/peft at the matching tag). The sdist lacks the
empty ``tests/__init__.py`` that PEFT's relative imports need; it is created in the extracted copy.

The chosen test files run with `loradrop_plugin` attaching LoRA Dropout (p = 0); with ``--baseline`` the tests that
did not pass run again without it (plain PEFT, same environment), so failures that are not loradrop's are told
apart. Each failure is classified from its message:

- ``refused_layer_type:<class>`` / ``refused_variant:<name>`` / ``refused_other``: loradrop refused the model with its
  documented message (`documented` says whether docs/COVERAGE.md lists the class or variant as refused);
- ``needs_hub``: the test needs a Hugging Face Hub model and this machine is offline (also fails in the baseline);
- ``unexpected``: anything else; these are the ones to investigate.

Example (what docs/COVERAGE.md quotes):

    .venv/bin/python benchmarks/peft_suite/run.py --files test_custom_models.py --baseline \\
        --out benchmarks/results/peft_suite_custom_models.json -- -k lora
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("LORADROP_PEFT_TESTS_CACHE", Path(tempfile.gettempdir()) / "loradrop-peft-tests"))

HUB = re.compile(r"OfflineModeIsEnabled|LocalEntryNotFoundError|offline mode|HF_HUB_OFFLINE|couldn't connect|"
                 r"Cannot reach|huggingface\.co|We couldn't connect|is not a local folder", re.I)
REFUSED_TYPE = re.compile(r"LoRA Dropout cannot run on .*?'[^']*' is ([A-Za-z_][\w.]*)")
REFUSED_VARIANT = re.compile(r"already uses the LoRA variant (\w+)|\) uses (Dora\w+Variant)")
LORADROP = re.compile(r"loradrop|LoRA Dropout", re.I)


def peft_tests(tests_dir: str | None) -> Path:
    """The folder that holds PEFT's ``tests/`` (downloaded and extracted once per PEFT version)."""
    if tests_dir is not None:
        root = Path(tests_dir).resolve()
        root = root.parent if root.name == "tests" else root
    else:
        peft_version = version("peft")
        root = CACHE / f"peft-{peft_version}"
        if not (root / "tests").is_dir():
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", f"peft=={peft_version}", "--no-deps",
                            "--no-binary", ":all:", "-d", str(CACHE)], check=True)
            with tarfile.open(CACHE / f"peft-{peft_version}.tar.gz") as archive:
                archive.extractall(CACHE, filter="data")
    if not (root / "tests").is_dir():
        raise SystemExit(f"no tests/ folder in {root}")
    (root / "tests" / "__init__.py").touch()
    return root


def run_pytest(root: Path, targets: list[str], enabled: bool, extra: list[str], timeout: int) -> tuple[list[dict], str]:
    """Run pytest on `targets` (files or node ids, passed in an @argfile) and return the plugin's report rows."""
    report = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    argfile = Path(tempfile.mkstemp(suffix=".txt")[1])
    argfile.write_text("\n".join(targets) + "\n")
    env = dict(os.environ, LORADROP_PEFT_SUITE="on" if enabled else "off", LORADROP_PEFT_SUITE_REPORT=str(report),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pytest", f"@{argfile}", "-p", "loradrop_plugin", "-q", "-o", "addopts=",
           "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", *extra]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    report.unlink()
    argfile.unlink()
    tail = lines[-1] if lines else proc.stderr[-2000:]
    return rows, tail


def outcomes(rows: list[dict]) -> dict[str, dict]:
    """Per test: passed / failed / skipped / error, with the first failure message."""
    result: dict[str, dict] = {}
    for row in rows:
        entry = result.setdefault(row["nodeid"], {"outcome": "passed", "message": "", "attached": None})
        if row["when"] == "call" and row["attached"] is not None:
            entry["attached"] = row["attached"]
        if row["outcome"] == "skipped":
            entry.update(outcome="skipped", message=row["message"])
        elif row["outcome"] == "failed" and entry["outcome"] != "failed":
            entry.update(outcome="failed" if row["when"] == "call" else "error", message=row["message"])
    return result


def classify(message: str, coverage: str) -> tuple[str, bool]:
    if match := REFUSED_TYPE.search(message):
        name = match.group(1).rsplit(".", 1)[-1]
        return f"refused_layer_type:{match.group(1)}", f"`{name}`" in coverage or f"{name} " in coverage
    if match := REFUSED_VARIANT.search(message):
        name = match.group(1) or match.group(2)
        return f"refused_variant:{name}", name in coverage
    if HUB.search(message):
        return "needs_hub", False
    if LORADROP.search(message):
        return "refused_other", False
    return "unexpected", False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=["test_custom_models.py"], help="test files under tests/")
    parser.add_argument("--tests-dir", help="a PEFT checkout (or its tests/ folder); default: the PyPI sdist")
    parser.add_argument("--baseline", action="store_true",
                        help="run the tests that fail with loradrop again without it (plain PEFT)")
    parser.add_argument("--out", required=True, help="summary JSON to write")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --, e.g. -- -k lora -x")
    args = parser.parse_args()

    root = peft_tests(args.tests_dir)
    coverage = (REPO / "docs" / "COVERAGE.md").read_text()
    start = time.time()
    with_ld, tail = run_pytest(root, [f"tests/{f}" for f in args.files], True, args.pytest_args, args.timeout)
    seconds = round(time.time() - start, 1)
    tests = outcomes(with_ld)
    base_tests, base_tail, base_seconds = {}, None, None
    if args.baseline:
        start = time.time()
        # only the tests that did not pass with loradrop: does plain PEFT pass them?
        failing = [n for n, t in tests.items() if t["outcome"] in ("failed", "error")]
        base_rows, base_tail = run_pytest(root, failing, False, [], args.timeout) if failing else ([], "nothing to run")
        base_seconds = round(time.time() - start, 1)
        base_tests = outcomes(base_rows)

    counts = collections.Counter(t["outcome"] for t in tests.values())
    classes: dict[str, dict] = {}
    kinds: dict[str, str] = {}
    for nodeid, test in sorted(tests.items()):
        if test["outcome"] not in ("failed", "error"):
            continue
        kind, documented = classify(test["message"], coverage)
        base = base_tests.get(nodeid, {}).get("outcome", "passed" if args.baseline else None)
        if kind == "unexpected" and base in ("failed", "error"):
            kind = "fails_without_loradrop_too"
        kinds[nodeid] = kind
        entry = classes.setdefault(kind, {"count": 0, "documented_refusal": documented, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < 5:
            entry["examples"].append({"test": nodeid, "message": test["message"][:400], "baseline": base})
    # Which tests exercised loradrop: attached (every model the test built took LoRA Dropout), refused (loradrop
    # refused a model the test built), or neither (another PEFT method whose name contains "lora", or no PeftModel).
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for nodeid, test in tests.items():
        if kinds.get(nodeid, "").startswith("refused"):
            group = "refused"
        elif test["attached"]:
            group = "attached"
        else:
            group = "neither"
        groups[group][test["outcome"]] += 1
    summary = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/peft_suite/run.py", *sys.argv[1:]]),
        "loradrop_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                          text=True).stdout.strip() or None,
        "peft": version("peft"), "tests_from": f"PyPI sdist peft-{version('peft')}" if args.tests_dir is None
        else str(root), "torch": version("torch"),
        "transformers": version("transformers"), "python": platform.python_version(), "machine": platform.machine(),
        "files": args.files, "seconds": seconds, "pytest_summary": tail,
        "counts": dict(counts), "tests": len(tests),
        "by_group": {group: dict(counter) for group, counter in sorted(groups.items())},
        "failure_classes": dict(sorted(classes.items(), key=lambda kv: -kv[1]["count"])),
    }
    if args.baseline:
        summary["baseline"] = {"seconds": base_seconds, "pytest_summary": base_tail,
                               "counts": dict(collections.Counter(t["outcome"] for t in base_tests.values()))}
        summary["baseline"]["note"] = "plain PEFT on the tests that did not pass with loradrop attached"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("counts", "by_group", "seconds")}))
    for kind, entry in summary["failure_classes"].items():
        print(f"{entry['count']:6d}  {kind}  documented={entry['documented_refusal']}")


if __name__ == "__main__":
    main()
