"""Runs the shipped configs and regenerates, checks or compares their documented results.

    python benchmarks/config_results.py --out results.json          # run every offline config
    python benchmarks/config_results.py --only digits_cnn --out r.json --metrics-dir m/
    python benchmarks/config_results.py --check                     # run, compare with the docs
    python benchmarks/config_results.py --update                    # run, rewrite the docs
    python benchmarks/config_results.py --update --from results.json   # rewrite, no runs
    python benchmarks/config_results.py --compare before.json after.json   # no runs

Every `configs/*.py` except the ones that need downloaded data (`EXTERNAL_DATA_CONFIGS` in
tests/helpers.py) is run in full, one after another in this process (as
tests/test_configs_slow.py runs them), each in a fresh temporary workdir. For each config
the output records the metric its docstring claims (`Reaches test accuracy X` ->
`test_accuracy`, `Reaches personal test accuracy X` -> `client_personal_accuracy_mean`,
`Reaches test MSE X` -> `test_mse`; the regex is the one tests/test_configs_slow.py uses),
the claimed and the measured value, every final metric (summary.json's `final`), the
final ε of private configs, the wall seconds of the run (building the data and model,
compiling and training; not importing jax), summary.json's compile seconds and seconds
per round, and all rows of metrics.jsonl. `--metrics-dir DIR` also keeps each config's
metrics.jsonl as DIR/<config>.jsonl. All of them take 5-10 minutes on an idle 2-core CPU.

`--repo DIR` runs the code and configs of another checkout (a `git worktree` of an older
commit, for instance): DIR goes first on sys.path, so its `fedjax_sim` is imported even
where another checkout is pip-installed in editable mode; the script stops if the imported
package is not DIR's. The output names the package file it imported and DIR's commit.

Comparing two results (`--compare A.json B.json`, e.g. before and after a refactoring):
per config, the metrics.jsonl rows must be identical, value for value (floats are compared
exactly as JSON stored them; NaN equals NaN), after timing fields are dropped. A timing
field is a key that contains `seconds` or `time`, or ends in `_s`. The rows carry no such
key today (they hold the round, the cohort's size and examples, the train_*, dp_*, test_*,
client_* and heldout_* metrics and ε, all repeated bit for bit by runs of one commit on
one machine); the timings live in summary.json, which is not compared. The rule keeps a
future timing column from failing the comparison; the keys it drops are listed. The first
differing round, key and values are printed; the exit status is 1 if any config differs
or is missing from one side (`--only NAME ...` compares only those configs).

Checking the documentation (`--check`): each config docstring's claim and its row of the
"Shipped configs" table (docs/configs-and-cli.md; README.md in checkouts older than the
docs/ pages) must be within `--tolerance` (0.002, as the slow test) of
the measured value; the secondary numbers the docstring and table state (the personal
and fine-tuned accuracies, ε, FedAvg's accuracy quoted by a FedProx config) must round to
the measured value or be within the tolerance. The documented seconds (`in about N s`,
the table's `N s`) are shown beside the measured ones but never fail the check: they
depend on the machine and its load. Exit status 1 on any mismatch.

`--update` rewrites those numbers from the results, keeping each number's decimals and
the surrounding text as they are; seconds are rounded to whole seconds, as the table
has them, and only where a number of seconds is already stated (`--keep-seconds` leaves
them alone). With `--from FILE` the results of an earlier `--out` are used and nothing
runs, so the numbers measured on one checkout can be written into another.
"""

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Configs that need downloads, should tests/helpers.py not be readable.
DEFAULT_EXTERNAL = {"cifar10_dirichlet.py", "emnist_tff.py", "femnist_leaf.py",
                    "shakespeare_leaf.py", "cifar10_resnet50_transfer.py"}

# The claim, as tests/test_configs_slow.py reads it.
CLAIM = re.compile(r"Reaches (personal )?test (accuracy|MSE) ([0-9.]+)")
CLAIM_KEYS = {"personal accuracy": "client_personal_accuracy_mean",
              "accuracy": "test_accuracy", "MSE": "test_mse"}
DOC_SECONDS = re.compile(r"in about ([0-9]+) s\b")

# The page that holds the "Shipped configs" table; README.md held it before docs/ existed.
TABLE_PAGES = ("docs/configs-and-cli.md", "README.md")

# Table row: | `name.py` | what | result |; the result cell's first number is the claim.
README_CLAIM = re.compile(r"(?:test acc|personal acc|test MSE) ([0-9.]+)")
README_SECONDS = re.compile(r", ([0-9]+) s\s*$")

NUM = r"([0-9]+(?:\.[0-9]+)?)"
# Secondary numbers: (regex with the number as group 1, metric key, whose results).
# Whose: None = the config's own; "fedavg" = <prefix>_fedavg of the same data set.
DOC_SECONDARY = [
    (re.compile(r"\(" + NUM + r" after\s+fine-tuning"), "client_finetuned_accuracy_mean", None),
    (re.compile(r"client_personal_accuracy\s+of\s+" + NUM), "client_personal_accuracy_mean", None),
    (re.compile(r"the\s+global\s+model\s+" + NUM), "client_test_accuracy_mean", None),
    (re.compile(r"ε = " + NUM), "epsilon", None),
    (re.compile(r"FedAvg\s+reaches\s+" + NUM), "test_accuracy", "fedavg"),
]
README_SECONDARY = [
    (re.compile(r"\(" + NUM + r" fine-tuned\)"), "client_finetuned_accuracy_mean", None),
    (re.compile(r"; personal " + NUM), "client_personal_accuracy_mean", None),
    (re.compile(r"ε = " + NUM), "epsilon", None),
    (re.compile(r"\(FedAvg " + NUM + r"\)"), "test_accuracy", "fedavg"),
]


def is_timing_key(key: str) -> bool:
    """A metrics-row key that holds a duration, left out of --compare."""
    return "seconds" in key or "time" in key or key.endswith("_s")


# --------------------------------------------------------------------------- configs


def external_configs(repo):
    """EXTERNAL_DATA_CONFIGS from <repo>/tests/helpers.py, read without importing it."""
    path = os.path.join(repo, "tests", "helpers.py")
    try:
        tree = ast.parse(open(path).read())
    except (OSError, SyntaxError):
        return set(DEFAULT_EXTERNAL)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "EXTERNAL_DATA_CONFIGS" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set(DEFAULT_EXTERNAL)


def offline_configs(repo, only=None):
    """Names (without .py) of the configs that run without downloads, sorted."""
    skip = external_configs(repo)
    names = sorted(f[:-3] for f in os.listdir(os.path.join(repo, "configs"))
                   if f.endswith(".py") and not f.startswith("_") and f not in skip)
    if only:
        wanted = [o[:-3] if o.endswith(".py") else o for o in only]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise SystemExit(f"not an offline config: {', '.join(unknown)} "
                             f"(offline: {', '.join(names)})")
        names = [n for n in names if n in wanted]
    return names


def read_claim(repo, name):
    """(metric, key, value) the docstring of configs/<name>.py claims, or None."""
    m = CLAIM.search(open(os.path.join(repo, "configs", name + ".py")).read())
    if not m:
        return None
    metric = ("personal " if m.group(1) else "") + m.group(2)
    return metric, CLAIM_KEYS[metric], float(m.group(3))


# --------------------------------------------------------------------------- running


def import_fedjax(repo):
    """Imports fedjax_sim from `repo`; returns (its __init__ file, load_config, run)."""
    sys.path.insert(0, repo)
    import fedjax_sim
    where = os.path.realpath(fedjax_sim.__file__)
    if not where.startswith(os.path.realpath(repo) + os.sep):
        raise SystemExit(f"imported fedjax_sim from {where}, not from {repo}")
    import importlib
    found = {}
    # Where they are now, then anywhere in the package (a module may have been renamed).
    candidates = [("fedjax_sim.cli.config", "load_config"), ("fedjax_sim.cli.experiment", "run")]
    for module, attr in candidates:
        try:
            found.setdefault(attr, getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    if len(found) < 2:
        package = os.path.dirname(where)
        patterns = {"load_config": re.compile(r"^def load_config\(", re.M),
                    "run": re.compile(r"^def run\(config\b", re.M)}
        for root, _, files in sorted(os.walk(package)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(root, f)
                text = open(path).read()
                for attr, pattern in patterns.items():
                    if attr not in found and pattern.search(text):
                        rel = os.path.relpath(path[:-3], os.path.dirname(package))
                        module = rel.replace(os.sep, ".").removesuffix(".__init__")
                        found[attr] = getattr(importlib.import_module(module), attr)
    if len(found) < 2:
        raise SystemExit(f"cannot find load_config and run in {os.path.dirname(where)}")
    return where, found["load_config"], found["run"]


def git_info(repo):
    def git(*args):
        try:
            return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    changed = git("status", "--porcelain", "--", "fedjax_sim", "configs")
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": None if changed is None else bool(changed)}


def run_configs(repo, names, metrics_dir=None):
    package, load_config, run = import_fedjax(repo)
    import jax
    print(f"fedjax_sim: {package}; jax {jax.__version__}, {jax.default_backend()}", flush=True)
    header = {"repo": os.path.abspath(repo), "fedjax_sim": package, **git_info(repo),
              "jax": jax.__version__, "backend": jax.default_backend(),
              "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
              "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if metrics_dir:
        os.makedirs(metrics_dir, exist_ok=True)
    results = {}
    t_all = time.perf_counter()
    for name in names:
        claim = read_claim(repo, name)
        entry = {"config": f"configs/{name}.py"}
        if claim:
            entry.update(claim_metric=claim[0], claim_key=claim[1], claimed=claim[2])
        workdir = tempfile.mkdtemp(prefix=f"config_results_{name}_")
        try:
            config = load_config(os.path.join(repo, "configs", name + ".py"))
            t0 = time.perf_counter()
            result = run(config, workdir, progress=False)
            entry["wall_seconds"] = time.perf_counter() - t0
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            with open(os.path.join(workdir, "summary.json")) as f:
                summary = json.load(f)
            final = summary["final"]
            entry["measured"] = final.get(claim[1]) if claim else None
            entry["final"] = final
            if "privacy" in summary:
                entry["privacy"] = summary["privacy"]
            epsilons = [r["epsilon"] for r in rows if "epsilon" in r]
            if epsilons:
                entry["epsilon"] = epsilons[-1]
            entry["compile_seconds"] = summary.get("compile_seconds")
            entry["seconds_per_round"] = summary.get("seconds_per_round")
            entry["rounds"] = summary.get("rounds")
            if metrics_dir:
                shutil.copyfile(os.path.join(workdir, "metrics.jsonl"),
                                os.path.join(metrics_dir, name + ".jsonl"))
            entry["rows"] = rows
            del result
        except Exception as e:  # noqa: BLE001 - recorded, the other configs still run
            entry["error"] = f"{type(e).__name__}: {e}"
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        results[name] = entry
        if "error" in entry:
            print(f"{name:24s} ERROR {entry['error']}", flush=True)
        else:
            claimed = f"{entry['claimed']:g}" if claim else "-"
            measured = f"{entry['measured']:.4f}" if entry["measured"] is not None else "-"
            print(f"{name:24s} {entry.get('claim_key', '-'):30s} claimed {claimed:>6s} "
                  f"measured {measured}  {entry['wall_seconds']:6.1f} s", flush=True)
    header["total_seconds"] = time.perf_counter() - t_all
    print(f"{len(names)} configs in {header['total_seconds']:.0f} s", flush=True)
    return {**header, "configs": results}


# --------------------------------------------------------------------------- --compare


def _same(a, b):
    """Equal as JSON text: floats bit for bit (their repr round-trips), NaN equal to NaN,
    1 and 1.0 different."""
    return json.dumps(a) == json.dumps(b)


def compare(path_a, path_b, only=None):
    """Prints, per config, whether the two results' metrics rows agree; returns the number of
    configs that differ or are on one side only (of `only`, if given)."""
    a, b = (json.load(open(p))["configs"] for p in (path_a, path_b))
    if only:
        wanted = {o.removesuffix(".py") for o in only}
        a, b = ({k: v for k, v in x.items() if k in wanted} for x in (a, b))
    bad = 0
    ignored = set()
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name:24s} only in {path_a if name in a else path_b}")
            bad += 1
            continue
        ra, rb = a[name].get("rows"), b[name].get("rows")
        if ra is None or rb is None:
            print(f"{name:24s} no rows: {a[name].get('error') or b[name].get('error')}")
            bad += 1
            continue
        diff = None
        for i in range(max(len(ra), len(rb))):
            if i >= len(ra) or i >= len(rb):
                diff = (f"{len(ra)} rows vs {len(rb)}: row {i + 1} is only in "
                        f"{path_a if i < len(ra) else path_b}")
                break
            row_a, row_b = ra[i], rb[i]
            keys = [k for k in dict.fromkeys([*row_a, *row_b]) if not is_timing_key(k)]
            ignored.update(k for k in [*row_a, *row_b] if is_timing_key(k))
            for k in keys:
                va, vb = row_a.get(k, "<missing>"), row_b.get(k, "<missing>")
                if not _same(va, vb):
                    diff = f"round {row_a.get('round', i + 1)} {k}: {va!r} vs {vb!r}"
                    break
            if diff:
                break
        if diff:
            bad += 1
            print(f"{name:24s} DIFFERENT  {diff}")
        else:
            print(f"{name:24s} identical  ({len(ra)} rows)")
    if ignored:
        print(f"timing keys left out: {', '.join(sorted(ignored))}")
    print(f"{bad} of {len(set(a) | set(b))} configs differ" if bad else
          f"all {len(set(a) | set(b))} configs identical")
    return bad


# --------------------------------------------------------------------------- docs


def _value(results, name, key, whose):
    if whose == "fedavg":
        name = name.split("_")[0] + "_fedavg"
    entry = results.get(name)
    if not entry or "error" in entry:
        return None
    if key == "epsilon":
        return entry.get("epsilon")
    return entry.get("final", {}).get(key)


def _fmt(value, like):
    """`value` with as many decimals as the documented text `like`."""
    decimals = len(like.split(".")[1]) if "." in like else 0
    return f"{value:.{decimals}f}"


def _near(documented, value, tolerance):
    return (abs(float(documented) - value) <= tolerance + 1e-12
            or _fmt(value, documented) == documented)


def _readme_row(text, name):
    m = re.search(rf"^\| `{re.escape(name)}\.py` \|.*$", text, re.M)
    if not m:
        return None
    cell = m.start() + m.group(0).rindex("|", 0, len(m.group(0).rstrip()) - 1) + 1
    return cell, m.end()  # span of the result cell (up to the line end)


def table_page(repo):
    """The file of `repo` that holds the "Shipped configs" table (TABLE_PAGES, in order)."""
    for page in TABLE_PAGES:
        path = os.path.join(repo, page)
        if os.path.isfile(path):
            return path
    raise SystemExit(f"no {' or '.join(TABLE_PAGES)} in {repo}")


def check_and_update(repo, results, tolerance, update, keep_seconds):
    """Compares (and with `update` rewrites) the numbers in the config docstrings and the
    "Shipped configs" table; returns the number of mismatches found before any rewrite."""
    readme_path = table_page(repo)
    readme = open(readme_path).read()
    bad = 0
    lines = []
    changed = []  # files rewritten
    print(f"{'config':24s} {'where':10s} {'number':30s} {'documented':>10s} {'measured':>10s}")

    def note(name, where, what, documented, value, ok):
        nonlocal bad
        bad += not ok
        shown = "-" if value is None else (f"{value:.0f}" if what == "seconds"
                                            else _fmt(value, documented + "0"))
        flag = "" if ok else "   MISMATCH"
        if ok and what != "seconds" and value is not None and _fmt(value, documented) != documented:
            flag = "   (within tolerance; rounds to " + _fmt(value, documented) + ")"
        lines.append(f"{name:24s} {where:10s} {what:30s} {documented:>10s} {shown:>10s}{flag}")

    def documented(name, entry, where, text, claim, group, key, secondary, seconds):
        """Notes every documented number of `text` (the claim, found by `claim`'s `group`;
        the secondary numbers; the seconds) against the results; returns the edits
        (start, end, new text) that would bring `text` up to date."""
        edits = []
        if claim is None or key is None:
            note(name, where, "claim", "none", None, False)
        else:
            shown, value = claim.group(group), entry["final"].get(key)
            note(name, where, key, shown, value,
                 value is not None and abs(float(shown) - value) <= tolerance + 1e-12)
            if value is not None:
                edits.append((claim.start(group), claim.end(group), _fmt(value, shown)))
        for pattern, skey, whose in secondary:
            for hit in pattern.finditer(text):
                value = _value(results, name, skey, whose)
                if value is None:
                    continue  # e.g. FedAvg not in these results
                note(name, where, skey + (" (fedavg)" if whose else ""), hit.group(1),
                     value, _near(hit.group(1), value, tolerance))
                edits.append((hit.start(1), hit.end(1), _fmt(value, hit.group(1))))
        if seconds:
            note(name, where, "seconds", seconds.group(1), entry["wall_seconds"], True)
            if not keep_seconds:
                edits.append((seconds.start(1), seconds.end(1), f"{entry['wall_seconds']:.0f}"))
        return edits

    for name in sorted(results):
        entry = results[name]
        if "error" in entry:
            print(f"{name:24s} not checked: {entry['error']}")
            bad += 1
            continue
        path = os.path.join(repo, "configs", name + ".py")
        if not os.path.isfile(path):
            print(f"{name:24s} not in {repo}/configs")
            bad += 1
            continue
        text = open(path).read()
        m = CLAIM.search(text)
        key = CLAIM_KEYS[("personal " if m.group(1) else "") + m.group(2)] if m else None
        edits = documented(name, entry, "docstring", text, m, 3, key, DOC_SECONDARY,
                           DOC_SECONDS.search(text))
        if update:
            new = text
            for start, end, rep in sorted(edits, reverse=True):
                new = new[:start] + rep + new[end:]
            if new != text:
                with open(path, "w") as f:
                    f.write(new)
                changed.append(path)

        span = _readme_row(readme, name)
        if span is None:
            note(name, "table", "table row", "none", None, False)
            continue
        cell = readme[span[0]:span[1]]
        key = key or entry.get("claim_key")
        # The cell's text without the closing "|" is a prefix of it: the offsets hold.
        edits = documented(name, entry, "table", cell, README_CLAIM.search(cell), 1, key,
                           README_SECONDARY, README_SECONDS.search(cell.rstrip().removesuffix("|")))
        if update:
            for start, end, rep in sorted(edits, reverse=True):
                cell = cell[:start] + rep + cell[end:]
            readme = readme[:span[0]] + cell + readme[span[1]:]
    print("\n".join(lines))
    if update:
        if readme != open(readme_path).read():
            with open(readme_path, "w") as f:
                f.write(readme)
            changed.append(readme_path)
        print("rewrote " + ", ".join(changed) if changed else "no documented number changed")
    return bad


# --------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the details.")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run (check, update, compare) only these configs")
    p.add_argument("--out", metavar="FILE.json", help="write the results here")
    p.add_argument("--metrics-dir", metavar="DIR",
                   help="copy each metrics.jsonl to DIR/<config>.jsonl")
    p.add_argument("--repo", default=REPO, help="the checkout whose fedjax_sim, configs and "
                                                "docs to use (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="compare the results with the documented ones")
    p.add_argument("--update", action="store_true",
                   help="rewrite the documented numbers from the results")
    p.add_argument("--keep-seconds", action="store_true",
                   help="with --update: leave the seconds as they are")
    p.add_argument("--from", dest="from_file", metavar="FILE.json",
                   help="with --check/--update: use these results (of --out) instead of running")
    p.add_argument("--tolerance", type=float, default=0.002,
                   help="allowed |documented - measured| (default: %(default)s, as the slow test)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="compare two results' metrics rows; runs nothing")
    args = p.parse_args(argv)

    if args.compare:
        return 1 if compare(*args.compare, only=args.only) else 0
    repo = os.path.abspath(args.repo)
    if args.from_file:
        if not (args.check or args.update):
            p.error("--from needs --check or --update")
        results = json.load(open(args.from_file))
        print(f"results of {results.get('repo')} at {results.get('commit')} "
              f"({results.get('started')})")
        configs = results["configs"]
        if args.only:
            wanted = {o.removesuffix(".py") for o in args.only}
            configs = {k: v for k, v in configs.items() if k in wanted}
    else:
        results = run_configs(repo, offline_configs(repo, args.only), args.metrics_dir)
        configs = results["configs"]
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
            print(f"wrote {args.out}")
    failed = sum("error" in e for e in configs.values())
    if args.check or args.update:
        failed = check_and_update(repo, configs, args.tolerance, args.update, args.keep_seconds)
        if args.update:
            return 1 if any("error" in e for e in configs.values()) else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
