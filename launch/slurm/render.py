#!/usr/bin/env python3
"""Render a Slurm template of launch/slurm/ into a ready-to-``sbatch`` script.

    python launch/slurm/render.py distill.sbatch --set NODES=4 GPUS_PER_NODE=8 \\
        CONFIG=configs/my_run.yaml SAVE_DIR=/checkpoints/my_run -o job.sbatch
    python launch/slurm/render.py teacher_service.sbatch --values values.yaml --set NODES=2 -o job.sbatch
    python launch/slurm/render.py distill.sbatch --list        # the template's variables and defaults

``#SBATCH`` lines cannot read shell variables, so the templates hold ``{{NAME}}`` placeholders. Every
placeholder of the template must be given (``--set NAME=VALUE``, or a YAML mapping ``NAME: value`` in
``--values FILE``; ``--set`` wins) or have a default (``VARIABLES`` below). A name the template does
not use, a missing value and an invalid value are errors naming the variable (exit 2). Values are
validated by kind: ``int`` (an integer in range), ``time`` (a Slurm time limit), ``slurm`` / ``path``
/ ``mem`` (they land in ``#SBATCH`` lines: letters, digits and ``_ . - + , : @ /`` only, no blanks,
quotes, ``$`` or other shell metacharacters), ``choice``, ``number`` (> 0), ``word`` (any one-line
text, written shell-quoted into the script body) and ``args`` (shell words, e.g. extra trainer
flags, each written shell-quoted). An optional variable left empty removes every template line
that holds it (e.g. no ``#SBATCH --partition`` line: the cluster's default). The output is the
template with every placeholder replaced, a comment listing the values after the shebang, mode 755.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
REQUIRED = object()  # default of a variable that must be given


@dataclass(frozen=True)
class Var:
    kind: str  # int | number | time | slurm | path | mem | choice | word | args
    default: object  # REQUIRED, a value, or a callable of the other (typed) values returning the value
    doc: str
    optional: bool = False  # "" allowed: the template lines holding it are dropped
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()


# The defaults table: every placeholder of every template, its kind, default and meaning.
# (launch/slurm/README.md documents the same table; tests/unit/test_slurm_templates.py checks they agree.)
VARIABLES: dict[str, Var] = {
    # --- #SBATCH directives (both templates) ---
    "JOB_NAME": Var("slurm", "distill", "job name (`#SBATCH --job-name`, `%x` in the log file names)"),
    "NODES": Var("int", 1, "training nodes (torchrun --nnodes); teacher_service.sbatch allocates one more node "
                           "for the service", minimum=1),
    "GPUS_PER_NODE": Var("int", 8, "GPUs per node (`#SBATCH --gpus-per-node`, torchrun --nproc-per-node)",
                         minimum=1, maximum=64),
    "CPUS_PER_TASK": Var("int", 32, "CPU cores per node (one task per node: torchrun and its workers)",
                         minimum=1, maximum=4096),
    "MEM": Var("mem", "", "memory per node (`#SBATCH --mem`, e.g. 0 = all of it, 512G); empty: no line, the "
                          "cluster's default", optional=True),
    "TIME": Var("time", "24:00:00", "time limit per run (`#SBATCH --time`: MM, HH:MM:SS, D-HH:MM:SS, ...); a "
                                    "requeued job gets it again"),
    "PARTITION": Var("slurm", "", "partition (`#SBATCH --partition`); empty: no line", optional=True),
    "ACCOUNT": Var("slurm", "", "account (`#SBATCH --account`); empty: no line", optional=True),
    "QOS": Var("slurm", "", "quality of service (`#SBATCH --qos`); empty: no line", optional=True),
    "SIGNAL_SECONDS": Var("int", 600, "seconds before the time limit at which the batch script gets SIGUSR1 "
                                      "(`#SBATCH --signal=B:USR1@N`): time to finish the iteration and save",
                          minimum=1, maximum=65535),
    "LOG_DIR": Var("path", "logs", "directory of the job logs `%x-%j.out` / `%x-%j.err` (relative: to the "
                                   "directory sbatch is run from; it must exist, Slurm does not create it)"),
    # --- script body ---
    "REPO_DIR": Var("word", lambda values: str(REPO_ROOT), "the megatron_distill checkout the job runs in (`cd` "
                                                   "there; relative paths below are relative to it)"),
    "PYTHON": Var("word", "python", "Python interpreter on the compute nodes (with torch and megatron_distill)"),
    "ENV_SCRIPT": Var("word", "", "file `source`d before the launch (modules, venv/conda activation); "
                                  "empty: none", optional=True),
    "CONFIG": Var("word", REQUIRED, "the run's YAML recipe (`--config-file`)"),
    "SAVE_DIR": Var("word", REQUIRED, "checkpoint directory (`--save DIR --auto-resume`, always given: a "
                                      "requeued job resumes from the newest complete checkpoint there)"),
    "EXTRA_ARGS": Var("args", "", "more trainer flags, shell words (e.g. `--train-iters 5000 --lr 1e-5`); they "
                                  "override the recipe; the flags the template sets itself are refused"),
    "MASTER_PORT": Var("int", 29500, "TCP port of torchrun's c10d rendezvous on the first training node",
                       minimum=1024, maximum=65535),
    "MAX_REQUEUES": Var("int", 20, "requeue at most this many times ($SLURM_RESTART_COUNT); then exit 75",
                        minimum=0),
    "NCCL_SOCKET_IFNAME": Var("word", "", "NCCL_SOCKET_IFNAME (network interface(s) for NCCL's bootstrap / "
                                          "socket traffic, e.g. ib0 or ^docker,lo); empty: NCCL's choice",
                              optional=True),
    "NCCL_IB_HCA": Var("word", "", "NCCL_IB_HCA (InfiniBand adapters, e.g. mlx5_0,mlx5_1); empty: NCCL's "
                                   "choice", optional=True),
    # --- teacher_service.sbatch only ---
    "TEACHER_DIR": Var("word", REQUIRED, "Hugging Face teacher directory the service loads (`--teacher-load`)"),
    "TOPK": Var("int", 256, "top-k of the teacher service (`--topk`) and of the trainer (`--kd-topk`)",
                minimum=1),
    "REPLICAS": Var("int", lambda v: max(1, int(v["GPUS_PER_NODE"] // v["TEACHER_GPUS_PER_REPLICA"])),
                    "teacher replicas (Ray actors) on the service node (`--replicas`); default: GPUS_PER_NODE / "
                    "TEACHER_GPUS_PER_REPLICA", minimum=1),
    "TEACHER_GPUS_PER_REPLICA": Var("number", 1, "GPUs per replica (`--gpus-per-replica`; may be a fraction)"),
    "TEACHER_CPUS_PER_REPLICA": Var("int", 2, "CPU cores per replica (`--cpus-per-replica`)", minimum=1),
    "TEACHER_DTYPE": Var("choice", "bfloat16", "teacher weights' dtype in the service (`--dtype`)",
                         choices=("bfloat16", "float16", "float32")),
    "PORT": Var("int", 8765, "TCP port of the teacher service (`--port`)", minimum=1024, maximum=65535),
    "SERVICE_START_TIMEOUT": Var("int", 1800, "seconds to wait for the service to load the teacher and listen "
                                              "before the job fails", minimum=1),
}

# Computed from other variables, never set: name -> (function of the typed values, meaning).
DERIVED: dict[str, tuple[Callable[[Mapping[str, object]], object], str]] = {
    "TOTAL_NODES": (lambda v: int(v["NODES"]) + 1, "NODES + 1 (teacher_service.sbatch: the trainer's nodes and "
                                                    "the service's node)"),
}

# Kinds whose values may land in #SBATCH lines (no shell quoting there).
SBATCH_SAFE_KINDS = {"int", "number", "time", "slurm", "path", "mem", "choice"}
# Flags the templates pass to the trainer themselves: EXTRA_ARGS must not repeat or undo them.
RESERVED_FLAGS = ("--config-file", "--save", "--load", "--auto-resume", "--no-auto-resume")
RESERVED_FLAGS_REMOTE = ("--teacher-remote", "--kd-topk", "--teacher-load")

_PATTERNS = {
    "slurm": re.compile(r"[A-Za-z0-9_.,+:@-]+"),
    "path": re.compile(r"[A-Za-z0-9_.,+:@/-]+"),
    "mem": re.compile(r"[0-9]+[KMGT]?"),
    "time": re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?"),
}


class RenderError(ValueError):
    """Invalid, missing or unknown values; ``problems`` lists each, naming the variable."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def time_limit_seconds(value: str) -> int:
    """Seconds of a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    m = _PATTERNS["time"].fullmatch(value)
    if not m:
        raise ValueError(value)
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is None:  # MM | MM:SS | HH:MM:SS
        h, mm, s = nums if len(nums) == 3 else (0, nums[0], nums[1] if len(nums) == 2 else 0)
    else:  # D-HH | D-HH:MM | D-HH:MM:SS
        h, mm, s = (*nums, 0, 0)[:3]
    return int(days or 0) * 86400 + h * 3600 + mm * 60 + s


def placeholders(template: str) -> list[str]:
    """The placeholder names of a template, in order of first use."""
    return list(dict.fromkeys(PLACEHOLDER.findall(template)))


def _check(name: str, var: Var, raw: object) -> tuple[object, str]:
    """(typed value, text written into the script) or ValueError with the reason."""
    if var.kind == "args" and isinstance(raw, (list, tuple)) and all(isinstance(w, (str, int, float)) for w in raw):
        raw = " ".join(shlex.quote(str(w)) for w in raw)  # a YAML list of words
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError(f"expected a {var.kind}, got {type(raw).__name__} {raw!r}")
    text = str(raw).strip() if var.kind != "args" else str(raw)
    if any(ch in text for ch in "\n\r\0"):
        raise ValueError("must be one line (no newline / NUL)")
    if text == "":
        if var.optional or var.kind == "args":
            return "", ""
        raise ValueError("must not be empty")
    if var.kind == "int":
        if not re.fullmatch(r"[0-9]+", text):
            raise ValueError(f"must be an integer, got {text!r}")
        value = int(text)
        if var.minimum is not None and value < var.minimum:
            raise ValueError(f"must be >= {var.minimum}, got {value}")
        if var.maximum is not None and value > var.maximum:
            raise ValueError(f"must be <= {var.maximum}, got {value}")
        return value, str(value)
    if var.kind == "number":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"must be a number > 0, got {text!r}")
        return value, f"{value:g}"
    if var.kind == "choice":
        if text not in var.choices:
            raise ValueError(f"must be one of {', '.join(var.choices)}, got {text!r}")
        return text, text
    if var.kind == "time":
        try:
            seconds = time_limit_seconds(text)
        except ValueError:
            raise ValueError(f"must be a Slurm time limit (MM, HH:MM:SS, D-HH:MM:SS, ...), got {text!r}") from None
        if seconds <= 0:
            raise ValueError(f"must be > 0, got {text!r}")
        return text, text
    if var.kind in ("slurm", "path", "mem"):
        if not _PATTERNS[var.kind].fullmatch(text):
            allowed = {"slurm": "letters, digits and _ . , + : @ -", "path": "letters, digits and _ . , + : @ - /",
                       "mem": "a number with an optional K/M/G/T suffix"}[var.kind]
            raise ValueError(f"lands in an #SBATCH line: only {allowed} (no blanks, quotes or shell "
                             f"metacharacters), got {text!r}")
        return text, text
    if var.kind == "word":
        return text, shlex.quote(text)
    if var.kind == "args":
        try:
            words = shlex.split(text)
        except ValueError as err:
            raise ValueError(f"not valid shell words ({err}): {text!r}") from None
        return words, " ".join(shlex.quote(w) for w in words)
    raise AssertionError(f"unknown kind {var.kind!r}")


def render(template: str, values: Mapping[str, object], template_name: str = "template") -> str:
    """The template with every placeholder replaced; RenderError lists every problem."""
    names = placeholders(template)
    problems: list[str] = []
    for name in names:
        if name not in VARIABLES and name not in DERIVED:
            problems.append(f"{template_name} uses {{{{{name}}}}}, which render.py does not know (template bug)")
    leftover = PLACEHOLDER.sub("", template)
    if "{{" in leftover or "}}" in leftover:
        problems.append(f"{template_name} has a '{{{{' or '}}}}' that is not a {{{{NAME}}}} placeholder")
    settable = [n for n in names if n in VARIABLES]
    for name in values:
        if name in DERIVED:
            problems.append(f"{name} is computed ({DERIVED[name][1]}), it cannot be set")
        elif name not in settable:
            problems.append(f"unknown variable {name} for {template_name} (its variables: {', '.join(settable)})")
    typed: dict[str, object] = {}
    text: dict[str, str] = {}
    computed = [n for n in settable if n not in values and callable(VARIABLES[n].default)]
    for name in [n for n in settable if n not in computed] + computed:  # computed defaults use the others
        var = VARIABLES[name]
        if name in computed:
            try:
                raw = var.default(typed)
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                continue  # an input it depends on is invalid: reported already
        else:
            raw = values.get(name, var.default)
        if raw is REQUIRED:
            problems.append(f"missing value for {name} ({var.doc}): give --set {name}=...")
            continue
        if raw is None:  # YAML "NAME:" with nothing after it
            raw = ""
        try:
            typed[name], text[name] = _check(name, var, raw)
        except ValueError as err:
            problems.append(f"invalid value for {name}: {err}")
    problems += _cross_checks(typed, names)
    for name in names:
        if name in DERIVED and not problems:
            value = DERIVED[name][0](typed)
            typed[name], text[name] = value, str(value)
    if not problems:  # placeholders on #SBATCH lines must be of a kind that is safe unquoted there
        for line in template.splitlines():
            if line.lstrip().startswith("#SBATCH"):
                for name in PLACEHOLDER.findall(line):
                    if name in VARIABLES and VARIABLES[name].kind not in SBATCH_SAFE_KINDS:
                        problems.append(f"{template_name}: {name} (kind {VARIABLES[name].kind}) is used in an "
                                        "#SBATCH line (template bug)")
    if problems:
        raise RenderError(problems)

    out_lines = []
    for line in template.splitlines(keepends=True):
        used = PLACEHOLDER.findall(line)
        if any(VARIABLES.get(n) is not None and VARIABLES[n].optional and text.get(n) == "" for n in used):
            continue  # an optional variable left empty: drop the line
        out_lines.append(PLACEHOLDER.sub(lambda m: text[m.group(1)], line))
    header = [f"# Rendered by launch/slurm/render.py from {template_name} with:\n"]
    header += [f"#   {n}={text[n]}\n" for n in names if n in text]
    if out_lines and out_lines[0].startswith("#!"):
        out_lines[1:1] = header
    else:
        out_lines[0:0] = header
    result = "".join(out_lines)
    assert "{{" not in result
    return result


def _cross_checks(v: Mapping[str, object], names: list[str]) -> list[str]:
    problems = []
    if "SIGNAL_SECONDS" in v and "TIME" in v and v["SIGNAL_SECONDS"] >= time_limit_seconds(v["TIME"]):
        problems.append(f"invalid value for SIGNAL_SECONDS: {v['SIGNAL_SECONDS']} s is not shorter than "
                        f"TIME {v['TIME']}: the job would be told to stop as soon as it starts")
    if "REPLICAS" in v and "TEACHER_GPUS_PER_REPLICA" in v and "GPUS_PER_NODE" in v:
        need = v["REPLICAS"] * v["TEACHER_GPUS_PER_REPLICA"]
        if need > v["GPUS_PER_NODE"] + 1e-9:
            problems.append(f"invalid value for REPLICAS: {v['REPLICAS']} replicas x TEACHER_GPUS_PER_REPLICA "
                            f"{v['TEACHER_GPUS_PER_REPLICA']:g} = {need:g} GPUs > GPUS_PER_NODE "
                            f"{v['GPUS_PER_NODE']} on the service node")
    if "REPLICAS" in v and "TEACHER_CPUS_PER_REPLICA" in v and "CPUS_PER_TASK" in v:
        need = v["REPLICAS"] * v["TEACHER_CPUS_PER_REPLICA"]
        if need > v["CPUS_PER_TASK"]:
            problems.append(f"invalid value for REPLICAS: {v['REPLICAS']} replicas x TEACHER_CPUS_PER_REPLICA "
                            f"{v['TEACHER_CPUS_PER_REPLICA']} = {need} CPUs > CPUS_PER_TASK {v['CPUS_PER_TASK']}")
    if "EXTRA_ARGS" in v:
        reserved = RESERVED_FLAGS + (RESERVED_FLAGS_REMOTE if "TOPK" in names else ())
        given = sorted({w.split("=", 1)[0] for w in v["EXTRA_ARGS"] if w.split("=", 1)[0] in reserved})
        if given:
            problems.append(f"invalid value for EXTRA_ARGS: {', '.join(given)} is set by the template itself "
                            "(use CONFIG / SAVE_DIR / TOPK / TEACHER_DIR)")
    return problems


def read_values(path: str) -> dict[str, object]:
    """A YAML (or JSON) mapping NAME: value."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise RenderError([f"--values {path}: expected a mapping NAME: value"])
    return data


def parse_sets(items: list[str]) -> dict[str, str]:
    values, problems = {}, []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            problems.append(f"--set {item!r}: expected NAME=VALUE")
        else:
            values[name] = value
    if problems:
        raise RenderError(problems)
    return values


def resolve_template(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    if (HERE / name).is_file():
        return HERE / name
    known = ", ".join(sorted(p.name for p in HERE.glob("*.sbatch")))
    raise RenderError([f"no template {name!r} (here or in {HERE}; templates: {known})"])


def describe(template: str) -> str:
    rows = []
    for name in placeholders(template):
        if name in DERIVED:
            rows.append(f"{name:26} (computed)  {DERIVED[name][1]}")
        elif name in VARIABLES:
            var = VARIABLES[name]
            default = var.default
            if default is REQUIRED:
                shown = "(required)"
            elif callable(default):
                try:
                    shown = repr(default({}))
                except KeyError:  # depends on other values
                    shown = "(computed)"
            else:
                shown = repr(default)
            rows.append(f"{name:26} {shown:12} {var.kind:7} {var.doc}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="render.py", description=__doc__.split("\n")[0])
    p.add_argument("template", help="template file, or its name in launch/slurm/ (distill.sbatch, ...)")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="NAME=VALUE",
                   help="set variables (wins over --values)")
    p.add_argument("--values", metavar="FILE", help="YAML mapping NAME: value")
    p.add_argument("-o", "--output", metavar="FILE", help="write the script here (mode 755); default: stdout")
    p.add_argument("--list", action="store_true", help="list the template's variables, defaults and meaning")
    a = p.parse_args(argv)
    try:
        path = resolve_template(a.template)
        template = path.read_text()
        if a.list:
            print(describe(template))
            return 0
        values = read_values(a.values) if a.values else {}
        values.update(parse_sets(a.sets))
        script = render(template, values, template_name=path.name)
    except RenderError as err:
        for problem in err.problems:
            print(f"render.py: error: {problem}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"render.py: error: {err}", file=sys.stderr)
        return 2
    if a.output:
        out = Path(a.output)
        out.write_text(script)
        out.chmod(0o755)
        log_dir = values.get("LOG_DIR", VARIABLES["LOG_DIR"].default)
        if "LOG_DIR" in placeholders(template) and not Path(str(log_dir)).is_dir():
            print(f"render.py: note: Slurm does not create the log directory: mkdir -p {log_dir} (relative to the "
                  "directory you run sbatch from) before submitting", file=sys.stderr)
        print(f"render.py: wrote {out} (submit with: sbatch {out})", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
