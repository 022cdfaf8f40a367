"""Fault rows, class 4: bad input that used to end in a traceback now ends in ONE line, exit status 2.

Each row runs `stic.cli.main` in this process and asserts the exit code, that stderr holds exactly one `stic: `
line naming the problem, and no traceback. Rows that were refused only after the model had loaded run with
model loading disabled (`no_model`), so they also prove the check happens at parse time.
"""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from stic.cli import main
from tests.conftest import selfgen_recipe

REPO = Path(__file__).resolve().parent.parent
TINY = {"name_or_path": "tiny:llava", "dtype": "float32"}


def one_line(argv, capsys, *words) -> str:
    """Run the command; it must exit 2 with one `stic: ` line holding every word, and no traceback."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stic: ")]
    assert info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def recipe_file(tmp_path, data: dict, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the row must be refused before."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("stic.models.load_model", refuse)


# ---------------------------------------------------------------------------------------------------------
# output_dir that is a file, sits under a file, or is read-only


def _stage_recipe(cmd: str, out: Path, tmp_path: Path, images: Path | None = None) -> tuple[list, dict]:
    """(argv after --recipe, recipe) of `cmd` whose only problem is its output folder `out` (for the training
    stages and eval, their data is missing too: the output folder is checked first)."""
    if cmd == "selfgen":
        return [], selfgen_recipe(out, {"type": "folder", "path": str(images or tmp_path)})
    if cmd == "dpo":
        return [], {"model": TINY, "dpo": {"output_dir": str(out), "dataset": str(tmp_path / "pairs")}}
    if cmd == "infuse-sft":
        return [], {"model": TINY, "infuse_sft": {"output_dir": str(out), "stage1_adapter": None,
                                                  "adapter_mode": "new", "data": {"path": str(tmp_path / "x.json")}}}
    return ["--model", "base", "--benchmarks", "pope"], {"eval": {"output_dir": str(out), "data_root": str(tmp_path)}}


@pytest.mark.parametrize("kind", ["file", "under_file", "read_only"])
@pytest.mark.parametrize("cmd", ["selfgen", "dpo", "infuse-sft", "eval"])
def test_output_dir_that_cannot_be_written(cmd, kind, tmp_path, capsys, monkeypatch, no_model, photo_dir):
    section = {"infuse-sft": "infuse_sft"}.get(cmd, cmd)
    if kind == "file":
        out = tmp_path / "out"
        out.write_text("not a folder")
        word = f"{out} is a file"
    elif kind == "under_file":
        (tmp_path / "f").write_text("not a folder")
        out = tmp_path / "f" / "out"
        word = f"{tmp_path / 'f'} is a file"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "out"
        word = "read-only"
        if os.geteuid() == 0:  # root writes anywhere: the folder is reported read-only as a read-only mount is
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != ro and real(p, mode, **k))
    extra, recipe = _stage_recipe(cmd, out, tmp_path, photo_dir)
    try:
        one_line([cmd, "--recipe", recipe_file(tmp_path, recipe), *extra], capsys, f"{section}.output_dir", word)
    finally:
        if kind == "read_only":
            (tmp_path / "ro").chmod(0o755)
    assert not out.is_dir()


# ---------------------------------------------------------------------------------------------------------
# a model that is neither a folder nor a hub id available offline; a failed start leaves no config behind


@pytest.mark.parametrize("name,word", [("{tmp}/no-such-model", "no such folder"),
                                       ("nobody/no-such-model-stic", "not in the hub cache"),
                                       ("{tmp}/r.yaml", "is a file")])
@pytest.mark.parametrize("cmd", ["selfgen", "dpo"])
def test_missing_model_path(cmd, name, word, tmp_path, capsys, monkeypatch, photo_dir):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    name = name.format(tmp=tmp_path)
    _, recipe = _stage_recipe(cmd, tmp_path / "out", tmp_path, photo_dir)
    recipe["model"] = {"name_or_path": name}
    one_line([cmd, "--recipe", recipe_file(tmp_path, recipe)], capsys, f"model.name_or_path {name}", word)


def test_failed_start_does_not_block_the_corrected_rerun(tmp_path):
    """A folder prepared by a run that stopped before any work (a model that failed to load) takes another
    configuration; one holding a part or a ledger line still refuses it."""
    from stic.store import OutputConflict, ShardedOutput

    out = tmp_path / "out"
    ShardedOutput(out).prepare({"model": {"name_or_path": "wrong"}})
    assert ShardedOutput(out).prepare({"model": {"name_or_path": "right"}}) is False  # not refused, nothing resumed
    assert json.loads((out / "run_config.json").read_text())["model"]["name_or_path"] == "right"
    ShardedOutput(out).log([{"id": "a", "status": "dropped"}])
    with pytest.raises(OutputConflict, match="differs in: model.name_or_path"):
        ShardedOutput(out).prepare({"model": {"name_or_path": "other"}})
    # a key the stored run does not have, set to null (a newer version's option): named too, not "differs in: )"
    with pytest.raises(OutputConflict, match=r"differs in: model.revision \(not in the stored run\)\)"):
        ShardedOutput(out).prepare({"model": {"name_or_path": "right", "revision": None}})


def test_failed_selfgen_start_then_rerun_is_not_refused(tmp_path, capsys, photo_dir):
    out = tmp_path / "out"
    recipe = selfgen_recipe(out, {"type": "folder", "path": str(photo_dir)})
    recipe["model"] = {"name_or_path": str(tmp_path / "typo")}
    one_line(["selfgen", "--recipe", recipe_file(tmp_path, recipe)], capsys, "no such folder")
    from stic.store import ShardedOutput

    ShardedOutput(out).prepare({"model": TINY})  # the corrected config: no "differs in: model.name_or_path"


# ---------------------------------------------------------------------------------------------------------
# prompt files, sizes and rates refused at parse time (they used to fail after the model had loaded)


@pytest.mark.parametrize("key,content,words", [
    ("selfgen.prompts.caption_prompts_file", "\n\n", ["caption prompts file", "holds no prompt"]),
    ("selfgen.prompts.hallucination_prompts_file", "[1, 2]", ["must hold strings"]),
    ("selfgen.prompts.hallucination_prompts_file", "[not json", ["not a valid JSON list"]),
    ("selfgen.prompts.good_prompt_file", "  \n", ["good prompt file", "is empty"]),
], ids=["empty_caption_file", "json_list_of_numbers", "invalid_json_list", "empty_good_prompt"])
def test_selfgen_prompt_files(key, content, words, tmp_path, capsys, no_model, photo_dir):
    (tmp_path / "p.txt").write_text(content)
    recipe = selfgen_recipe(tmp_path / "out", {"type": "folder", "path": str(photo_dir)})
    one_line(["selfgen", "--recipe", recipe_file(tmp_path, recipe), f"{key}={tmp_path / 'p.txt'}"], capsys, *words)


PARSE_TIME_ROWS = [
    ("dpo", "dpo.per_device_train_batch_size=0", "per_device_train_batch_size must be at least 1"),
    ("dpo", "dpo.per_device_train_batch_size=-2", "per_device_train_batch_size must be at least 1"),
    ("dpo", "dpo.gradient_accumulation_steps=0", "gradient_accumulation_steps must be at least 1"),
    ("dpo", "dpo.per_device_eval_batch_size=0", "per_device_eval_batch_size must be at least 1"),
    ("dpo", "dpo.learning_rate=-1", "learning_rate must be positive"),
    ("dpo", "dpo.lora_r=0", "lora_r must be at least 1"),
    ("dpo", "dpo.lora_dropout=1.5", "lora_dropout in [0, 1)"),
    ("dpo", "dpo.num_train_epochs=0", "num_train_epochs must be positive"),
    ("infuse-sft", "infuse_sft.per_device_train_batch_size=0", "per_device_train_batch_size must be at least 1"),
    ("infuse-sft", "infuse_sft.learning_rate=-1", "learning_rate must be positive"),
    ("infuse-sft", "infuse_sft.lora_r=0", "lora_r must be at least 1"),
    ("infuse-sft", "infuse_sft.subset.size=0", "infuse_sft.subset: size must be at least 1"),
    ("infuse-sft", "infuse_sft.describe.batch_size=0", "infuse_sft.describe: batch_size and images_per_part"),
    ("infuse-sft", "infuse_sft.describe.caption_prompts_file={empty}", "holds no prompt"),
    ("eval", "eval.batch_size=0", "eval: batch_size must be at least 1"),
    ("eval", "eval.limit=0", "eval: limit must be at least 1"),
    ("selfgen", "selfgen.batch_size=0", "batch_size, images_per_part and consistency_samples must be at least 1"),
]


@pytest.mark.parametrize("cmd,override,word", PARSE_TIME_ROWS,
                         ids=[o.split("=")[0] + "=" + o.split("=")[1][:6] for _, o, _ in PARSE_TIME_ROWS])
def test_bad_number_is_a_recipe_error_before_the_model(cmd, override, word, tmp_path, capsys, no_model):
    (tmp_path / "empty.txt").write_text("")
    section = {"infuse-sft": "infuse_sft"}.get(cmd, cmd)
    extra, recipe = _stage_recipe(cmd, tmp_path / "out", tmp_path)
    argv = [cmd, "--recipe", recipe_file(tmp_path, recipe), *extra, override.format(empty=tmp_path / "empty.txt")]
    line = one_line(argv, capsys, "stic: recipe error", word)
    assert section in line


# ---------------------------------------------------------------------------------------------------------
# selfgen resumed over a truncated part


def test_selfgen_resume_over_a_truncated_part(tmp_path, capsys, no_model, photo_dir):
    from stic.prompts import load_prompts
    from stic.selfgen import parse_recipe, run_config

    out = tmp_path / "out"
    recipe = selfgen_recipe(out, {"type": "folder", "path": str(photo_dir)})
    parsed = parse_recipe(recipe)
    (out / "data").mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps(run_config(parsed, load_prompts(parsed.selfgen.prompts))))
    part = out / "data" / "train-0-r000-00000.parquet"
    part.write_bytes(b"PAR1" + b"\0" * 40)  # a part cut short
    one_line(["selfgen", "--recipe", recipe_file(tmp_path, recipe)], capsys, str(part), "truncated or corrupt",
             "delete it")
    assert part.exists()  # nothing is deleted behind the user's back


# ---------------------------------------------------------------------------------------------------------
# an OpenAI-compatible endpoint that answers nonsense


@pytest.fixture
def endpoint():
    """endpoint(body) serves `body` (bytes) with status 200 to every request; returns its /v1 URL."""
    servers = []

    def serve(body: bytes) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(http)
        return f"http://127.0.0.1:{http.server_port}/v1"

    yield serve
    for http in servers:
        http.shutdown()
        http.server_close()


@pytest.mark.parametrize("body,word", [
    (b"<html>not json", "not valid JSON"),
    (json.dumps({"choices": [{"index": 0, "finish_reason": "stop"}]}).encode(), "without a message"),
    (json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                               "content": 5}}]}).encode(),
     "without a message"),
    (json.dumps({"choices": "x"}).encode(), "without choices"),
    (json.dumps([1, 2]).encode(), "without choices"),
], ids=["invalid_json", "no_message", "content_not_text", "choices_not_a_list", "reply_a_list"])
def test_endpoint_reply_that_is_not_a_completion(body, word, endpoint, tmp_path, capsys, photo_dir, no_model):
    url = endpoint(body)
    recipe = selfgen_recipe(tmp_path / "out", {"type": "folder", "path": str(photo_dir)})
    recipe["generation"] = {"backend": "openai", "endpoints": [url], "model": "m", "max_retries": 0,
                            "max_concurrency": 1}
    one_line(["selfgen", "--recipe", recipe_file(tmp_path, recipe)], capsys, "127.0.0.1", word)


# ---------------------------------------------------------------------------------------------------------
# `stic score`: a predictions file with bad lines; benchmark files with records missing fields


def _pope_root(root: Path) -> Path:
    coco = root / "pope" / "coco"
    coco.mkdir(parents=True)
    for split in ("adversarial", "popular", "random"):
        (coco / f"coco_pope_{split}.json").write_text(
            json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}) + "\n")
    return root


@pytest.mark.parametrize("lines,word", [
    (['{"text": "yes"}'], "line 1: expected an object with a question_id"),
    (['{"question_id": "random/1", "text": "yes"}', "{oops"], "line 2: not valid JSON"),
    (['{"question_id": "random/1", "text": ["yes"]}'], "line 1: text must be a string"),
    (["[1, 2]"], "line 1: expected an object with a question_id"),
    (['{"question_id": ["a"], "text": "yes"}'], "line 1: expected an object with a question_id"),
], ids=["no_question_id", "bad_json_line", "text_not_a_string", "line_not_an_object", "unhashable_id"])
def test_score_predictions_file(lines, word, tmp_path, capsys):
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(lines) + "\n")
    one_line(["score", "--benchmark", "pope", "--predictions", pred, "--data-root", _pope_root(tmp_path / "d")],
             capsys, str(pred), word)


def _bench_files(root: Path, name: str) -> None:
    """Benchmark files of `name` whose records lack a field the loader reads."""
    def put(rel, data, lines=False):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(json.dumps(d) for d in data) + "\n" if lines else json.dumps(data))

    if name == "textvqa":
        put("textvqa/llava_textvqa_val_v051_ocr.jsonl", [{"question_id": "i", "image": "a.jpg", "text": "q?"}],
            lines=True)
        put("textvqa/TextVQA_0.5.1_val.json", {"data": [{"image_id": "i", "question": "q?"}]})  # no answers
    elif name == "scienceqa":
        put("scienceqa/llava_test_CQM-A.json", [{"id": "1", "image": "a.png",
                                                 "conversations": [{"value": "<image>\nQ?"}]}])
        put("scienceqa/problems.json", {"1": {"answer": 0}})  # no choices
    elif name == "scienceqa_turns":
        put("scienceqa/llava_test_CQM-A.json", [{"id": "1", "image": "a.png", "conversations": []}])
        put("scienceqa/problems.json", {"1": {"answer": 0, "choices": ["a", "b"]}})
    elif name == "llava_bench":
        d = "llava-bench-in-the-wild"
        put(f"{d}/questions.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "q", "category": "conv"}],
            lines=True)
        put(f"{d}/context.jsonl", [{"caption": "c"}], lines=True)  # no image
        put(f"{d}/answers_gpt4.jsonl", [{"question_id": 1, "text": "a"}], lines=True)
    elif name == "mmvet":
        put("mm-vet/mm-vet.json", [{"imagename": "a.jpg"}])  # a list, not an object by id
    elif name == "mathvista":
        put("mathvista/testmini.json", [{"question": "q"}])
    elif name == "chartqa":
        put("chartqa/test_human.json", {"imgname": "a.png"})


@pytest.mark.parametrize("name,word", [
    ("textvqa", "TextVQA_0.5.1_val.json data[0]: missing field answers"),
    ("scienceqa", "problems.json problem 1: missing field choices"),
    ("scienceqa_turns", "llava_test_CQM-A.json record 0: conversations must be a list"),
    ("llava_bench", "context.jsonl line 1: missing field image"),
    ("mmvet", "mm-vet.json: expected an object"),
    ("mathvista", "testmini.json: expected an object"),
    ("chartqa", "test_human.json: expected a list"),
])
def test_benchmark_record_missing_fields(name, word, tmp_path, capsys):
    _bench_files(tmp_path, name)
    (tmp_path / "pred.jsonl").write_text("")
    bench = name.split("_turns")[0]
    one_line(["score", "--benchmark", bench, "--predictions", tmp_path / "pred.jsonl", "--data-root", tmp_path],
             capsys, word)


# ---------------------------------------------------------------------------------------------------------
# new-user friction: help and recipe typos without torch; overrides typed by their key


def test_help_and_a_recipe_typo_do_not_import_torch(tmp_path):
    """`stic --help`, `stic dpo --help` and an unknown recipe key come back without importing torch (5-15 s of
    imports): help and key lists come from stic.recipe_cache, which any earlier parse fills."""
    from stic.recipe import SECTION_CLASSES, recipe_keys_help
    from stic.recipe_cache import cached_help, remember_keys

    remember_keys(SECTION_CLASSES)
    cached_help(["dpo", "model"], recipe_keys_help)
    recipe = recipe_file(tmp_path, {"model": TINY, "dpo": {"learning_rat": 1e-4}})
    script = ("import sys\nfrom stic.cli import main\ncodes = []\n"
              f"for argv in (['--help'], ['dpo', '--help'], ['dpo', '--recipe', {str(recipe)!r}]):\n"
              "    try:\n        main(argv)\n    except SystemExit as e:\n        codes.append(e.code)\n"
              "print(codes, 'torch' in sys.modules, 'trl' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.stdout.strip().splitlines()[-1] == "[0, 0, 2] False False", done.stdout[-500:] + done.stderr[-2000:]
    assert "dpo.learning_rat (did you mean dpo.learning_rate?)" in done.stderr
    assert "dpo.lora_r (int, default 128)" in done.stdout  # the stage's recipe keys, from the cache


@pytest.mark.parametrize("override,attr,expected", [
    ("dpo.learning_rate=1e-7", ("dpo", "learning_rate"), 1e-7),
    ("dpo.save_strategy=no", ("dpo", "save_strategy"), "no"),
    ("model.revision=1.0", ("model", "revision"), "1.0"),
    ("dpo.output_dir=2024", ("dpo", "output_dir"), "2024"),
    ("name=yes", ("name",), "yes"),
    ("dpo.resume=yes", ("dpo", "resume"), True),
    ("dpo.max_samples=null", ("dpo", "max_samples"), None),
])
def test_override_value_is_read_by_the_key_type(override, attr, expected):
    from stic.config import load_recipe_dict
    from stic.dpo import parse_recipe

    value = parse_recipe(load_recipe_dict(None, [override]))
    for name in attr:
        value = getattr(value, name)
    assert value == expected and isinstance(value, type(expected))  # "no" not False, "1.0" not 1.0


def test_recipe_file_number_without_a_dot_is_a_float(tmp_path):
    """PyYAML reads `1e-7` as a string (YAML 1.1 wants a dot); a float key takes it."""
    from stic.config import load_recipe_dict
    from stic.dpo import parse_recipe

    (tmp_path / "r.yaml").write_text("dpo:\n  learning_rate: 1e-7\n  beta: 5E-2\n")
    dpo = parse_recipe(load_recipe_dict(tmp_path / "r.yaml")).dpo
    assert (dpo.learning_rate, dpo.beta) == (1e-7, 0.05)


@pytest.mark.parametrize("override,word", [("dpo.learning_rate=fast", "dpo.learning_rate: expected a number, got 'fast'"),
                                           ("dpo.per_device_train_batch_size=1e3", "expected an integer, got '1e3'"),
                                           ("dpo.resume=maybe", "dpo.resume: expected true or false")])
def test_override_of_the_wrong_type_is_one_line(override, word, tmp_path, capsys, no_model):
    one_line(["dpo", "--recipe", recipe_file(tmp_path, {"model": TINY}), override], capsys, "stic: recipe error", word)


def test_library_noise_is_silenced_at_its_source():
    """The deprecation FutureWarning PEFT/TRL trigger and transformers' "mtime may not be reliable" are dropped
    by stic's filters; their neighbours still show. (A subprocess: pytest resets warning filters per test.)"""
    script = (
        "import logging, warnings, stic\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
        "    warnings.warn('`other_thing` is deprecated', FutureWarning)\n"
        "logging.basicConfig(format='%(message)s')\n"
        "log = logging.getLogger('transformers.trainer_utils')\n"
        "log.warning('mtime may not be reliable on this filesystem, falling back to numerical ordering')\n"
        "log.warning('another trainer_utils warning')\n"
        "print([str(w.message) for w in seen])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.stdout.strip() == "['`other_thing` is deprecated']", done.stdout + done.stderr
    assert done.stderr.strip() == "another trainer_utils warning", done.stderr


def test_dar_reports_the_tokens_it_generates(monkeypatch):
    """DaR's progress bar showed tok_s=0.0: both of its passes now report their tokens."""
    from stic.generation import Output
    from stic.infuse import describe_and_respond

    class Engine:
        def generate(self, requests, sampling, on_batch=None):
            if on_batch:
                on_batch(len(requests), 7 * len(requests))
            return [Output("a red cube", "eos", 7) for _ in requests]

    seen = []
    describe_and_respond(Engine(), [None, None], ["q1", "q2"], on_batch=lambda n, tokens: seen.append(tokens))
    assert seen == [14, 14]
