"""Fault suite, input part: bad worlds, recipes, datasets and servers get one line naming the problem, exit 2, no
traceback, before any work (or, where data is skipped instead, the reason is recorded).

Each row runs `stic.cli.main` in this process and checks the one stderr line that starts with "stic: ".
"""

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from stic.cli import main
from tests.conftest import conv, photo

REPO = Path(__file__).resolve().parent.parent


def refused(argv: list[str], capsys) -> str:
    """Run the command; it must exit 2 with exactly one `stic: ` line on stderr and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stic: ")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# A. World files: every value within what the world can draw (an impossible object count used to loop forever)


def world_with(tmp_path, edit) -> Path:
    data = yaml.safe_load((REPO / "recipes/shapesworld/world.yaml").read_text())
    edit(data)
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(section, key, value):
    def edit(data):
        data[section][key] = value
    return edit


WORLD_ROWS = {
    "objects_per_scene_12_hangs": (_set("scenes", "objects_per_scene", [12]), "scenes.objects_per_scene"),
    "objects_per_scene_10": (_set("scenes", "objects_per_scene", [10]), "scenes.objects_per_scene"),
    "objects_per_scene_empty": (_set("scenes", "objects_per_scene", []), "scenes.objects_per_scene"),
    "objects_per_scene_zero": (_set("scenes", "objects_per_scene", [0]), "scenes.objects_per_scene"),
    "objects_over_max_objects": (_set("scenes", "objects_per_scene", [5]), "scenes.objects_per_scene"),
    "max_objects_over_types": (lambda d: d["scenes"].update(max_objects=6, objects_per_scene=[6]),
                               "scenes.max_objects"),
    "qa_kinds_empty": (_set("qa", "kinds", []), "qa.kinds"),
    "qa_per_scene_negative": (_set("qa", "per_scene", -1), "qa.per_scene"),
    "background_shade_inverted": (_set("scenes", "background_shade", [70, 20]), "scenes.background_shade"),
    "background_shade_one_value": (_set("scenes", "background_shade", [20]), "scenes.background_shade"),
    "co_occurrence_over_1": (_set("scenes", "co_occurrence", 1.5), "scenes.co_occurrence"),
    "faint_prob_negative": (_set("scenes", "faint_prob", -0.1), "scenes.faint_prob"),
    "rgb_out_of_range": (lambda d: d["colors"].update(red=[300, -5, 0]), "colors.red"),
    "rgb_two_values": (lambda d: d["colors"].update(red=[220, 40]), "colors.red"),
    "radius_over_cell": (lambda d: d["scenes"]["radius"].update(large=40), "scenes.radius.large"),
    "radius_missing_size": (_set("scenes", "radius", {"small": 3}), "scenes.radius"),
    "presence_yes_over_1": (_set("qa", "presence_yes", 2.0), "qa.presence_yes"),
    "invented_negative": (lambda d: d["sources"]["imaginative"].update(invented=[-1]),
                          "sources.imaginative.invented"),
}


@pytest.mark.parametrize("row", sorted(WORLD_ROWS))
def test_world_value_it_cannot_draw_is_refused_before_any_scene(row, tmp_path, capsys):
    edit, key = WORLD_ROWS[row]
    world = world_with(tmp_path, edit)
    out = tmp_path / "data"
    line = refused(["shapes", "make-data", "--world", world, "-o", out, "--train", "2", "--heldout", "2"], capsys)
    assert line.startswith(f"stic: error: world file {world}: ") and key in line, line
    assert not out.exists()


def test_default_world_still_loads_with_its_recorded_digest(capsys):
    from stic.shapes import world as W

    # the calibrated world's digest (recipes/shapesworld/calibration/v4a*.json): its data must stay identical
    assert W.load_world().digest() == "5ec1ed143f37"
    for path in sorted((REPO / "recipes/shapesworld/candidates").glob("*.yaml")):
        W.load_world(path)  # every calibration candidate is still a drawable world


# ---------------------------------------------------------------------------------------------------------
# B. Recipe values that used to run with exit 0 and do nothing, or nonsense


def recipe_file(tmp_path, data=None) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data or {"model": {"name_or_path": "tiny:llava", "dtype": "float32"}}))
    return path


RECIPE_ROWS = {
    "dpo_beta_negative": ("dpo", ["dpo.beta=-0.5"], "dpo: beta must be positive"),
    "dpo_beta_zero": ("dpo", ["dpo.beta=0"], "dpo: beta must be positive"),
    "dpo_sft_weight_negative": ("dpo", ["dpo.sft_weight=-1"], "dpo: sft_weight must be at least 0"),
    "dpo_zero_epochs": ("dpo", ["dpo.num_train_epochs=0"], "dpo: num_train_epochs must be positive"),
    "dpo_zero_epochs_zero_steps": ("dpo", ["dpo.num_train_epochs=0", "dpo.max_steps=0"],
                                   "dpo: num_train_epochs must be positive"),
    "dpo_negative_epochs": ("dpo", ["dpo.num_train_epochs=-1"], "dpo: num_train_epochs must be positive"),
    "infuse_zero_epochs": ("infuse-sft", ["infuse_sft.num_train_epochs=0"],
                           "infuse_sft: num_train_epochs must be positive"),
    "top_p_over_1": ("selfgen", ["selfgen.rejected_sampling.top_p=2.0"],
                     "selfgen.rejected_sampling: top_p must lie in (0, 1]"),
    "top_p_zero": ("selfgen", ["selfgen.rejected_sampling.top_p=0"],
                   "selfgen.rejected_sampling: top_p must lie in (0, 1]"),
    "temperature_negative": ("selfgen", ["selfgen.chosen_sampling.temperature=-1"],
                             "selfgen.chosen_sampling: temperature must be at least 0"),
    "max_new_tokens_zero": ("selfgen", ["selfgen.chosen_sampling.max_new_tokens=0"],
                            "selfgen.chosen_sampling: max_new_tokens must be at least 1"),
    "describe_top_p_over_1": ("infuse-sft", ["infuse_sft.describe.sampling.top_p=1.5"],
                              "infuse_sft.describe.sampling: top_p must lie in (0, 1]"),
    "eval_limit_negative": ("eval", ["eval.limit=-1"], "eval: limit must be at least 1"),
    "eval_limit_zero": ("eval", ["eval.limit=0"], "eval: limit must be at least 1"),
}


@pytest.mark.parametrize("row", sorted(RECIPE_ROWS))
def test_nonsense_recipe_value_is_refused_at_parse_time(row, tmp_path, capsys):
    command, overrides, message = RECIPE_ROWS[row]
    out = tmp_path / "out"
    section = command.replace("-", "_")
    argv = [command, "--recipe", recipe_file(tmp_path), f"{section}.output_dir={out}", *overrides]
    if command == "eval":
        argv += ["--benchmarks", "pope"]
    line = refused(argv, capsys)
    assert line.startswith("stic: recipe error: ") and message in line, line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# A. The endpoint timeout is a deadline; C. the key never leaves the process


class Server:
    """A loopback endpoint with one behaviour: "echo401" refuses the key, quoting the Authorization header back
    (as some proxies do); "trickle" answers 200 and then one byte every 0.2 s, never finishing."""

    def __init__(self, mode: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hits, self.times, self.stop = 0, [], threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                server.hits += 1
                server.times.append(time.monotonic())
                if mode == "echo401":
                    body = json.dumps({"error": {"message": f"bad header {self.headers['Authorization']}"}}).encode()
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    while not server.stop.wait(0.2):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                except OSError:  # the client gave up
                    pass

            def log_message(self, *a):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_port}/v1"

    def close(self):
        self.stop.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server():
    made = []
    yield lambda mode: made.append(Server(mode)) or made[-1]
    for s in made:
        s.close()


def served_selfgen_recipe(tmp_path, photo_dir, url, **generation) -> Path:
    return recipe_file(tmp_path, {
        "model": {"name_or_path": "tiny:llava"},
        "generation": {"backend": "openai", "endpoints": [url], "model": "m", "max_concurrency": 1, **generation},
        "selfgen": {"output_dir": str(tmp_path / "out"), "images": {"type": "folder", "path": str(photo_dir)},
                    "images_per_part": 1}})


def test_trickling_endpoint_is_given_up_at_the_deadline(tmp_path, photo_dir, server, capsys, monkeypatch):
    monkeypatch.setattr("stic.serving.backoff_seconds", lambda attempt: 0.01)
    slow = server("trickle")
    recipe = served_selfgen_recipe(tmp_path, photo_dir, slow.url, timeout=1, max_retries=1, max_endpoint_failures=5)
    line = refused(["selfgen", "--recipe", recipe], capsys)
    took = time.monotonic() - slow.times[0]  # from the first request: the imports before it are not the point
    assert line.startswith("stic: error: a request failed 2 times") and "generation.timeout (1 s)" in line, line
    assert slow.hits == 2 and took < 1 * (1 + 1) + 3, took


def test_trickling_endpoint_is_dropped_under_the_failure_rule(tmp_path, photo_dir, server, capsys, monkeypatch):
    monkeypatch.setattr("stic.serving.backoff_seconds", lambda attempt: 0.01)
    slow = server("trickle")
    recipe = served_selfgen_recipe(tmp_path, photo_dir, slow.url, timeout=1, max_retries=5, max_endpoint_failures=2)
    line = refused(["selfgen", "--recipe", recipe], capsys)
    assert line.startswith("stic: error: no generation endpoint left") and "generation.timeout" in line, line
    assert slow.hits == 2


def test_api_key_echoed_by_the_server_is_redacted(tmp_path, photo_dir, server, capsys, monkeypatch):
    secret = "sk-echoed-back-9876"
    monkeypatch.setenv("MY_FLEET_KEY", secret)
    echo = server("echo401")
    recipe = served_selfgen_recipe(tmp_path, photo_dir, echo.url, api_key_env="MY_FLEET_KEY")
    with pytest.raises(SystemExit) as exit_info:
        main(["selfgen", "--recipe", str(recipe)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stic: ")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("stic: error: ") and "refused the key" in lines[0] and "<$MY_FLEET_KEY>" in lines[0]
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert secret not in err and secret not in written


def test_judge_redacts_an_echoed_key_and_keeps_its_deadline(tmp_path, server, monkeypatch):
    from stic.judge import Judge, JudgeConfig, JudgeUnavailable

    secret = "sk-judge-echoed-5555"
    monkeypatch.setenv("STIC_JUDGE_API_KEY", secret)
    monkeypatch.setattr("stic.serving.backoff_seconds", lambda attempt: 0.01)
    monkeypatch.setenv("STIC_JUDGE_BASE_URL", server("echo401").url)
    with pytest.raises(JudgeUnavailable) as info:
        Judge(JudgeConfig(), tmp_path / "cache.jsonl").ask("q", 0.0)
    assert "refused the key" in str(info.value) and secret not in str(info.value)
    assert "<$STIC_JUDGE_API_KEY>" in str(info.value)
    trickle = server("trickle")
    monkeypatch.setenv("STIC_JUDGE_BASE_URL", trickle.url)
    with pytest.raises(JudgeUnavailable, match=r"failed 2 tries; last: no complete reply within eval.judge.timeout_s"):
        Judge(JudgeConfig(timeout_s=1, max_retries=2), tmp_path / "cache.jsonl").ask("q", 0.0)
    assert trickle.hits == 2 and time.monotonic() - trickle.times[0] < 1 * 2 + 3


# ---------------------------------------------------------------------------------------------------------
# B. Data that used to train silently, or fail at step 0


def stic_record(image):
    turn = lambda text: [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": text}]
    return {"image": image, "chosen": turn("A car."), "rejected": turn("A boat.")}


def dpo_refused(tmp_path, capsys, dataset, *overrides) -> str:
    recipe = recipe_file(tmp_path)
    return refused(["dpo", "--recipe", recipe, f"dpo.dataset={dataset}", f"dpo.output_dir={tmp_path / 'o'}",
                    "dpo.report_to=[]", *overrides], capsys)


def test_dpo_rows_without_an_image_are_refused_with_their_count(tmp_path, capsys):
    photo(0).save(tmp_path / "a.jpg")
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "Describe."}], "chosen": [{"role": "assistant", "content": "A"}],
             "rejected": [{"role": "assistant", "content": "B"}], "images": [str(tmp_path / "a.jpg")] if i else []}
            for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = dpo_refused(tmp_path, capsys, data)
    assert line.startswith(f"stic: error: dataset {data}: 1 of 3 rows have no image (first: row 0)"), line
    assert not (tmp_path / "o").exists()


def test_dpo_parquet_part_missing_a_column_is_named_at_load(tmp_path, capsys):
    import pandas as pd

    (tmp_path / "ds" / "data").mkdir(parents=True)
    row = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "A"}],
           "rejected": [{"role": "assistant", "content": "B"}]}
    pd.DataFrame([row]).to_parquet(tmp_path / "ds" / "data" / "train-0.parquet")
    pd.DataFrame([{k: v for k, v in row.items() if k != "rejected"}]).to_parquet(
        tmp_path / "ds" / "data" / "train-1.parquet")
    line = dpo_refused(tmp_path, capsys, tmp_path / "ds")
    assert line.startswith(f"stic: error: dataset part {tmp_path / 'ds' / 'data' / 'train-1.parquet'} has other "
                           "columns than train-0.parquet: lacks rejected"), line


def instruction_file(tmp_path, records) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    photo(0).save(tmp_path / "img" / "a.jpg")
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(records))
    return path


MALFORMED = {
    "image_twice": (conv("<image>\nQ?", "A", "<image>\nAgain?", "B"), "<image> 2 times"),
    "human_after_human": ([{"from": "human", "value": "<image>\nQ?"}, {"from": "human", "value": "Q2?"},
                           {"from": "gpt", "value": "A"}], "turns do not alternate (turn 2 is human again)"),
    "gpt_first": ([{"from": "gpt", "value": "A"}, {"from": "human", "value": "<image>\nQ?"},
                   {"from": "gpt", "value": "B"}], "the first turn is gpt, not human"),
    "final_human_turn": (conv("<image>\nQ?", "A", "And?"), "the last turn is human"),
    "image_in_gpt_turn": (conv("<image>\nQ?", "It is <image>"), "<image> in a gpt turn"),
}


def test_malformed_llava_records_are_skipped_with_their_reason(tmp_path):
    from stic.instructions import InstructionDataConfig, load_instructions

    records = [{"id": name, "image": "a.jpg", "conversations": turns} for name, (turns, _) in MALFORMED.items()]
    records.append({"id": "good", "image": "a.jpg", "conversations": conv("<image>\nQ?", "A", "More?", "B")})
    cfg = InstructionDataConfig(path=str(instruction_file(tmp_path, records)), image_folder=str(tmp_path / "img"))
    usable, skipped = load_instructions(cfg)
    assert [r["id"] for r in usable] == ["good"]
    reasons = {s["id"]: s["reason"] for s in skipped}
    for name, (_, reason) in MALFORMED.items():
        assert reasons[name].startswith(reason), (name, reasons[name])


def test_infuse_sft_with_only_malformed_records_says_why(tmp_path, capsys):
    records = [{"id": name, "image": "a.jpg", "conversations": turns} for name, (turns, _) in MALFORMED.items()]
    data = instruction_file(tmp_path, records)
    recipe = recipe_file(tmp_path)
    line = refused(["infuse-sft", "--recipe", recipe, f"infuse_sft.output_dir={tmp_path / 's2'}",
                    f"infuse_sft.data.path={data}", f"infuse_sft.data.image_folder={tmp_path / 'img'}"], capsys)
    assert line.startswith(f"stic: error: no usable record in {data} (5 skipped: ") and "<image> in a gpt turn" in line


# ---------------------------------------------------------------------------------------------------------
# D. Image paths stay inside their folder unless the recipe allows otherwise


@pytest.mark.parametrize("image", ["../outside.jpg", "/etc/passwd", "sub/../../outside.jpg"])
def test_dpo_record_image_outside_its_folder_is_refused(image, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    photo(0).save(tmp_path / "outside.jpg")
    data = tmp_path / "data" / "pairs.json"
    data.write_text(json.dumps([stic_record(image)]))
    line = dpo_refused(tmp_path, capsys, data)
    assert line == (f"stic: error: {data}: record 0: image {image!r} lies outside the image folder "
                    f"{tmp_path / 'data'}; set dpo.allow_outside_image_folder: true to read it"), line


def test_dpo_outside_images_when_allowed_are_read_and_a_non_image_is_refused_at_load(tmp_path, capsys):
    from stic.dpo import load_preference_dataset, parse_recipe

    (tmp_path / "data").mkdir()
    photo(0).save(tmp_path / "outside.jpg")
    data = tmp_path / "data" / "pairs.json"
    data.write_text(json.dumps([stic_record("../outside.jpg")]))
    recipe = parse_recipe({"model": {"name_or_path": "tiny:llava"},
                           "dpo": {"dataset": str(data), "allow_outside_image_folder": True, "report_to": []}})
    assert load_preference_dataset(recipe.dpo)[0]["images"][0].size == (72, 56)
    data.write_text(json.dumps([stic_record("/etc/passwd")]))  # used to pass the check and fail at step 2
    line = dpo_refused(tmp_path, capsys, data, "dpo.allow_outside_image_folder=true")
    assert line.startswith(f"stic: error: dataset {data}: row 0: '/etc/passwd' is not a readable image"), line


def test_instruction_image_outside_image_folder_is_refused(tmp_path, capsys):
    photo(0).save(tmp_path / "outside.jpg")
    data = instruction_file(tmp_path, [{"id": "x", "image": "../outside.jpg", "conversations": conv("<image>\nQ?", "A")}])
    recipe = recipe_file(tmp_path)
    argv = ["infuse-sft", "--recipe", recipe, f"infuse_sft.output_dir={tmp_path / 's2'}", f"infuse_sft.data.path={data}",
            f"infuse_sft.data.image_folder={tmp_path / 'img'}"]
    line = refused(argv, capsys)
    assert line == (f"stic: error: {data}: record 0 (id 'x'): image '../outside.jpg' lies outside image_folder "
                    f"{tmp_path / 'img'}; set infuse_sft.data.allow_outside_image_folder: true to read it"), line
    assert not (tmp_path / "s2").exists()

    from stic.instructions import InstructionDataConfig, load_instructions

    usable, _ = load_instructions(InstructionDataConfig(path=str(data), image_folder=str(tmp_path / "img"),
                                                        allow_outside_image_folder=True))
    assert usable[0]["image_path"] == str(tmp_path / "img" / ".." / "outside.jpg")


@pytest.mark.parametrize("kind", ["manifest", "coco"])
def test_manifest_path_outside_the_image_root_is_refused(kind, tmp_path, photo_dir, capsys):
    (tmp_path / "lists").mkdir()
    if kind == "manifest":
        source = tmp_path / "lists" / "m.jsonl"
        source.write_text(json.dumps({"path": "../photos/img0.jpg"}) + "\n")
        where = f"manifest {source} line 1"
    else:
        source = tmp_path / "lists" / "coco.json"
        source.write_text(json.dumps({"images": [{"file_name": str(photo_dir / "img0.jpg")}]}))
        where = f"COCO file {source} images[0]"
    recipe = recipe_file(tmp_path)
    out = tmp_path / "out"
    argv = ["selfgen", "--recipe", recipe, f"selfgen.output_dir={out}", f"selfgen.images.type={kind}",
            f"selfgen.images.path={source}"]
    line = refused(argv, capsys)
    assert line.startswith(f"stic: error: {where}: path ") and f"lies outside the image root {tmp_path / 'lists'}; " \
        "set selfgen.images.allow_outside_image_root: true" in line, line
    assert not out.exists()

    from stic.images import ImageSourceConfig, list_images

    refs = list_images(ImageSourceConfig(type=kind, path=str(source), allow_outside_image_root=True))
    assert len(refs) == 1 and Path(refs[0].path).is_file()
