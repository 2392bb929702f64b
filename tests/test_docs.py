"""The README and docs/ say what the code does: every command names files, configs and flags that exist, every
relative link and anchor resolves, the config table lists exactly the `qft` keys, and the README's
instruction-data rows and command work as written (placeholders filled in, a short run asked for)."""
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = ("deepspeed", "torchrun", "accelerate", "python", "bash", "sbatch", "env", "qft_ds", "launch/", "pip")
SCRIPT_SUFFIXES = (".py", ".sh", ".sbatch")
# paths a command may name that are the user's own (outputs, data, placeholders), not the repo's
REPO_DIRS = ("ds_configs/", "bench/", "examples/", "launch/", "docs/", "tests/", "qft_ds/", "ops/")


def _code_lines(text: str) -> list[str]:
    """Command lines of a markdown text: indented and fenced code blocks (not python ones), and inline code
    spans that start with a launcher. Continuation backslashes are joined; comments are dropped."""
    lines, fence, out = text.splitlines(), None, []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:] or "text"
            continue
        if fence is not None:
            if fence in ("bash", "sh", "console", "text"):
                out.append(line)
        elif line.startswith("    ") and (i == 0 or not lines[i - 1].strip() or lines[i - 1].startswith("    ")):
            out.append(line)
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.M | re.S)  # fenced blocks would mis-pair backticks
    out += [m.group(1) for m in re.finditer(r"`([^`]+)`", prose)
            if m.group(1).startswith(LAUNCHERS) and " " in m.group(1)]
    joined, buf = [], ""
    for line in out:
        buf += line.strip().rstrip("\\") + " "
        if not line.rstrip().endswith("\\"):
            joined.append(buf.strip())
            buf = ""
    cmds = []
    for line in joined:
        line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
        if line.startswith(LAUNCHERS) or line.startswith("# runs: env"):
            cmds.append(line.removeprefix("# runs: "))
    return cmds


def _commands():
    for doc in DOCS:
        for cmd in _code_lines(doc.read_text()):
            yield doc.relative_to(ROOT).as_posix(), cmd


def _script_source(tokens: list[str]) -> tuple[int, str] | None:
    """(index of the script token, the text its flags must appear in) for a command line; None for a user's
    own script (`python your_script.py`) or a command without one."""
    for i, tok in enumerate(tokens):
        if tok == "qft_ds" and i + 1 < len(tokens):
            return i + 1, (ROOT / "qft_ds" / "cli.py").read_text()
        if tok.endswith(SCRIPT_SUFFIXES) and (tok == "train.py" or tok.startswith(REPO_DIRS)):
            path = ROOT / tok
            assert path.is_file(), f"no script {tok}"
            return i, path.read_text()
    return None


@pytest.mark.parametrize("doc,cmd", list(_commands()))
def test_commands_name_existing_files_and_flags(doc, cmd):
    tokens = [t.strip("[]") for t in shlex.split(cmd.replace("$(git rev-parse HEAD)", "COMMIT"))]
    for tok in tokens:
        if tok.startswith(REPO_DIRS) and not tok.startswith(("launch/hostfile", "runs/")):
            assert (ROOT / tok.split(":")[0]).exists(), f"{doc}: `{cmd}` names {tok}, which does not exist"
    found = _script_source(tokens)
    if found is None:
        return
    i, source = found
    script = tokens[i]
    for tok in tokens[i + 1:]:
        if tok == "--":  # the launch scripts hand what follows to train.py
            script, source = "train.py", (ROOT / "train.py").read_text()
            continue
        if not tok.startswith("--") or tok == "--help":
            continue
        flag = tok.split("=")[0]
        bare = "--" + flag[len("--no-"):] if flag.startswith("--no-") else flag
        assert re.search(re.escape(bare) + r"\b", source), f"{doc}: `{cmd}`: {script} has no {flag}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    bad = []
    for doc in [*DOCS, ROOT / "bench" / "NOTES.md"]:
        text = re.sub(r"`[^`]*`", "", doc.read_text())  # code spans hold no links (`kernel[grid](*args)`)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                bad.append(f"{doc.name}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", dest.read_text(), re.M)}
                if anchor not in slugs:
                    bad.append(f"{doc.name}: {target} (no such heading)")
    assert not bad, bad


def test_result_files_named_in_the_docs_exist():
    bad = []
    for doc in DOCS:
        for name in re.findall(r"bench/results/[\w./*-]+", doc.read_text()):
            name = name.rstrip(".")
            if "*" not in name and not (ROOT / name).exists():
                bad.append(f"{doc.name}: {name}")
    assert not bad, bad


def _qft_table(text: str, intro: str) -> list[str]:
    """The keys of the `qft` table that follows `intro`."""
    section = text.split(intro, 1)[1].split("\n\n", 2)[1]
    return re.findall(r"^\| `(\w+)` \|", section, re.M)


def test_config_tables_list_the_qft_keys():
    """docs/config.md lists exactly the `qft` keys; the README's short table only real ones, with the same
    defaults and meanings (its rows are copies of config.md's)."""
    from qft_ds.config import QFTConfig
    full = (ROOT / "docs" / "config.md").read_text()
    assert sorted(_qft_table(full, 'The `"qft"` section:')) == sorted(QFTConfig.keys())
    readme = (ROOT / "README.md").read_text()
    short = _qft_table(readme, "(all of them:\n[docs/config.md](docs/config.md)):")
    assert short and set(short) <= set(QFTConfig.keys())
    # the same row, its links written from each file's folder
    rows = {line.split("`")[1]: line.replace("(../README.md#", "(#") for line in full.splitlines()
            if line.startswith("| `")}
    for line in readme.splitlines():
        if line.startswith("| `") and line.split("`")[1] in short:
            assert line.replace("(docs/config.md#", "(#").replace("(docs/", "(") == rows[line.split("`")[1]], line


def test_readme_instruction_rows_are_the_formats_they_show(tmp_path):
    from qft_ds import sftdata
    readme = (ROOT / "README.md").read_text()
    rows = [line.strip() for line in readme.splitlines() if line.startswith("    {\"")]
    assert len(rows) == 3, rows
    kinds = []
    for n, row in enumerate(rows):
        path = tmp_path / f"{n}.jsonl"
        path.write_text(row + "\n")
        kinds.append(sftdata.dataset_format(str(path)))
        sftdata.read_sft_jsonl(path)
    assert kinds == ["prompt_completion", "messages", "prompt_completion"]
    assert isinstance(json.loads(rows[2])["prompt"], list)  # the conversational form


def test_readme_instruction_command_runs_as_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The README's instruction-data command, run through train.py in-process: its files are written, its
    optional `[--eval_dataset ...]` kept, and a tiny local model and a short run are asked for."""
    import train
    from conftest import WORDS
    cmd = next(c for _, c in _commands() if "--dataset train.jsonl" in c)
    tokens = [t.strip("[]") for t in shlex.split(cmd)]
    assert tokens[:4] == ["deepspeed", "--num_gpus", "1", "train.py"], tokens
    argv = tokens[4:]
    rows = [{"prompt": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4)), "completion": " the king"}
            for i in range(40)]
    for name, part in (("train.jsonl", rows[:36]), ("val.jsonl", rows[36:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        argv[argv.index(name)] = str(tmp_path / name)  # the user's files
    monkeypatch.chdir(ROOT)  # run from the repo root, as the README does
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    train.main([*argv, "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"), "--max_steps", "2"])
    out = capsys.readouterr().out
    assert "36 train examples (prompt_completion, up to 512 tokens), 4 held-out examples" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_readme_help_command_runs_as_written():
    """`python train.py --help`, from the repo root: every option the README names is listed."""
    import subprocess
    cmd = next(c for _, c in _commands() if c.startswith("python train.py --help"))
    res = subprocess.run(shlex.split(cmd), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for flag in ("--model", "--dataset", "--max_steps", "--output_dir", "--save_every", "--resume_from_checkpoint",
                 "--seed", "--eval_dataset"):
        assert flag in res.stdout, flag
