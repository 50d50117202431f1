"""The paper's seven lm-eval tasks, fed from local copies of the benchmarks (air-gapped nodes).

lm-eval's own task definitions are used unchanged: each task is wrapped in a one-member group
whose member overrides only where the data comes from (`dataset_path: json` + absolute
`data_files`) and which splits exist (ecosystem-facts section 3b, "way 2": no site-packages path
and no copy of the built-in YAML). Prompts, targets and metrics stay lm-eval's.

The local files (`../shared/data/evals`, see its README) differ from the hub's; each converter
below turns one into exactly the fields the task reads, and nothing else:

| task           | local file(s)                               | conversion                                  |
|----------------|---------------------------------------------|---------------------------------------------|
| lambada_openai | lambada_test.jsonl                          | none (field `text`)                         |
| wikitext       | HF rows joined with "\\n"                   | rows -> the 62 articles (field `page`)      |
| hellaswag      | 6-line text dump per item                   | -> activity_label, ctx_a, ctx_b, endings, label (lossy, see below) |
| piqa           | valid.jsonl + valid-labels.lst              | merge `label` (int)                         |
| social_iqa     | dev.jsonl + dev-labels.lst                  | merge `label` (string "1"/"2"/"3")          |
| arc_easy       | one JSON array (HF schema)                  | -> jsonl                                    |
| winogrande     | dev.jsonl                                   | none                                        |
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import yaml

from cocomix.data import DataError
from cocomix.files import atomic_write_text

PAPER_TASKS = ("lambada_openai", "wikitext", "hellaswag", "piqa", "social_iqa", "arc_easy", "winogrande")

# The metric the paper reports for each task (spec section 5), as lm-eval names it.
PAPER_METRICS = {
    "lambada_openai": ("perplexity", "acc"),
    "wikitext": ("word_perplexity",),
    "hellaswag": ("acc_norm",),
    "piqa": ("acc",),
    "social_iqa": ("acc",),
    "arc_easy": ("acc",),
    "winogrande": ("acc",),
}

# Documents in the split lm-eval evaluates (its task YAMLs: lambada_openai/test, wikitext
# document-level/test, hellaswag/validation, piqa/validation, social_iqa/validation,
# arc_easy/test, winogrande_xl/validation).
OFFICIAL_DOC_COUNTS = {
    "lambada_openai": 5153,
    "wikitext": 62,
    "hellaswag": 10042,
    "piqa": 1838,
    "social_iqa": 1954,
    "arc_easy": 2376,
    "winogrande": 1267,
}

# Folder of each task's YAML inside lm_eval/tasks: indexing only these folders instead of all
# ~14,700 task names saves ~10 s per TaskManager (ecosystem-facts section 3).
LM_EVAL_TASK_FOLDERS = {
    "lambada_openai": "lambada",
    "wikitext": "wikitext",
    "hellaswag": "hellaswag",
    "piqa": "piqa",
    "social_iqa": "siqa",
    "arc_easy": "arc",
    "winogrande": "winogrande",
}

OFFLINE_SUFFIX = "_offline"


# --------------------------------------------------------------------------------------
# Readers: local file(s) -> rows with the fields lm-eval's task reads
# --------------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _with_labels(rows: list[dict], labels_path: Path, cast: Callable[[str], object]) -> list[dict]:
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(rows)} rows")
    return [{**row, "label": cast(label)} for row, label in zip(rows, labels)]


def read_lambada(folder: Path) -> list[dict]:
    return _jsonl(folder / "lambada_test.jsonl")


def read_piqa(folder: Path) -> list[dict]:
    return _with_labels(_jsonl(folder / "valid.jsonl"), folder / "valid-labels.lst", int)


def read_social_iqa(folder: Path) -> list[dict]:
    # The hub rows hold the 1-based label as a string; the task's target is `label|int - 1`.
    return _with_labels(_jsonl(folder / "dev.jsonl"), folder / "dev-labels.lst", str)


def read_winogrande(folder: Path) -> list[dict]:
    return _jsonl(folder / "dev.jsonl")


def read_arc_easy(folder: Path) -> list[dict]:
    return json.loads((folder / "ARC-Easy_test.hf_ai2_arc.json").read_text(encoding="utf-8"))


def read_hellaswag(folder: Path) -> list[dict]:
    """6 lines per item: `activity_label: ctx`, label, 4 endings (klosax's cleaned dump).

    Lossy: the dump joins ctx_a and ctx_b, so ctx_b cannot be capitalised as lm-eval does
    ("... a roof. he" instead of "... a roof. He"), and its bracket clean-up is close to, not
    identical with, lm-eval's. The whole context goes to ctx_a with an empty ctx_b; lm-eval's
    `preprocess` strips the trailing space that leaves. Accuracy is close to the hub's, not equal.
    """
    lines = (folder / "hellaswag_val_full.klosax.txt").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        raise DataError(f"{folder / 'hellaswag_val_full.klosax.txt'}: {len(lines)} lines is not 6 per item")
    rows = []
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i : i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep:  # no activity label: keep the line whole as context
            activity, ctx = "", head
        rows.append({"activity_label": activity, "ctx_a": ctx, "ctx_b": "", "endings": endings, "label": label})
    return rows


_TOP_HEADING = re.compile(r"^ = [^=].* = $")


def wikitext_rows(text: str) -> list[str]:
    """Recover HF `wikitext-2-raw-v1` test rows from `"\\n".join(rows)` (non-empty rows end in "\\n")."""
    pieces = text.split("\n")
    rows, i = [], 0
    while i < len(pieces):
        if pieces[i]:
            rows.append(pieces[i] + "\n")
            i += 2  # the empty piece after it is the row's own newline
        else:
            rows.append("")
            i += 1
    return rows


def wikitext_pages(rows: list[str]) -> list[str]:
    """The document-level articles lm-eval's `wikitext` task reads (field `page`).

    EleutherAI/wikitext_document_level splits `wiki.test.raw` into lines, starts a page at every
    top-level heading (" = Title = ") and joins the page's lines with "\\n". The raw file stores
    blank lines as " " where HF rows hold "", so blank lines are restored as " "; a page may still
    differ from the hub's in whitespace where the raw file had other blank-line content.
    """
    lines = [row[:-1] if row else " " for row in rows]
    pages: list[list[str]] = []
    for line in lines:
        if _TOP_HEADING.match(line):
            pages.append([])
        if pages:
            pages[-1].append(line)
    return ["\n".join(page) for page in pages]


def read_wikitext(folder: Path) -> list[dict]:
    text = (folder / "wikitext-2-raw-v1_test.hf_rows_newline_joined.txt").read_text(encoding="utf-8")
    return [{"page": page} for page in wikitext_pages(wikitext_rows(text))]


@dataclass(frozen=True)
class LocalTask:
    name: str  # lm-eval's task name
    folder: str  # sub-folder of the local data directory
    split: str  # the split lm-eval evaluates ("test" or "validation")
    read: Callable[[Path], list[dict]]


LOCAL_TASKS = {
    t.name: t
    for t in (
        LocalTask("lambada_openai", "lambada_openai", "test", read_lambada),
        LocalTask("wikitext", "wikitext", "test", read_wikitext),
        LocalTask("hellaswag", "hellaswag", "validation", read_hellaswag),
        LocalTask("piqa", "piqa", "validation", read_piqa),
        LocalTask("social_iqa", "social_iqa", "validation", read_social_iqa),
        LocalTask("arc_easy", "arc_easy", "test", read_arc_easy),
        LocalTask("winogrande", "winogrande", "validation", read_winogrande),
    )
}


# --------------------------------------------------------------------------------------
# Writing the converted data + group YAMLs
# --------------------------------------------------------------------------------------


def write_if_changed(path: Path, text: str) -> None:
    """Atomic write that keeps the file (and its mtime) when the content is unchanged, so
    `datasets`' cache, keyed on the data files, is reused across evaluations."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def offline_group(task: str, data_file: Path, split: str) -> dict:
    """A one-member group whose member is lm-eval's built-in `task`, reading `data_file`.

    A bare top-level `{"task": "hellaswag", "dataset_path": ...}` does NOT merge with the built-in
    (ecosystem-facts 3b); a group member does. Only the evaluated split exists locally, so the
    others are switched off (zero-shot needs no training split).
    """
    member = {
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file.resolve())}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
    }
    return {"group": task + OFFLINE_SUFFIX, "task": [member], "metadata": {"version": 1.0}}


def prepare_offline_tasks(source_dir: str | Path, out_dir: str | Path, tasks: list[str]) -> dict[str, dict]:
    """Convert the local copies of `tasks` into `out_dir/<task>/<split>.jsonl` and write one group
    YAML per task into `out_dir` (usable as `lm_eval --include_path out_dir --tasks <task>_offline`).
    Returns {task: group config} for `lm_eval.simple_evaluate`."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    groups = {}
    for name in tasks:
        spec = LOCAL_TASKS[name]
        folder = source_dir / spec.folder
        if not folder.is_dir():
            raise DataError(
                f"task {name}: no local copy at {folder}; set eval.task_data (--task-data) to the folder "
                "holding the benchmark copies, or eval.task_data=null to load it from the Hugging Face Hub"
            )
        try:
            rows = spec.read(folder)
        except FileNotFoundError as e:
            raise DataError(f"task {name}: missing file {e.filename}; set eval.task_data (--task-data) "
                            "to a complete copy, or eval.task_data=null to load it from the Hub") from None
        data_file = out_dir / name / f"{spec.split}.jsonl"
        write_if_changed(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        group = offline_group(name, data_file, spec.split)
        write_if_changed(out_dir / f"{name}{OFFLINE_SUFFIX}.yaml", yaml.safe_dump(group, sort_keys=False))
        groups[name] = group
    return groups


def iter_rows(source_dir: str | Path, task: str) -> Iterator[dict]:
    """The converted rows of one task (for inspection and tests)."""
    yield from LOCAL_TASKS[task].read(Path(source_dir) / LOCAL_TASKS[task].folder)
