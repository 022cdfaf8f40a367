"""The openai generation backend against a real `transformers serve` of the committed ShapesWorld model.

One server for the whole session (started on a free loopback port, stopped at the end); stub servers on
loopback (tests/conftest.py: Stub) stand in for endpoints that die, refuse the key or are overloaded.
"""

import json
from pathlib import Path

import pytest
import yaml

from stic.config import RecipeError
from stic.serving import EndpointError, transformers_serve
from stic.shapes.world import make_split
from tests.conftest import die_on_call, free_port, selfgen_run

REPO = Path(__file__).resolve().parent.parent
MODEL = str(REPO / "models" / "shapesworld-base")


@pytest.fixture(scope="session")
def server():
    """`transformers serve` of the ShapesWorld model on CPU, for the whole session; yields its /v1 URL."""
    with transformers_serve(MODEL) as url:
        yield url


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Four ShapesWorld scenes: images/, scenes.jsonl, qa.jsonl, instructions.json."""
    return make_split(tmp_path_factory.mktemp("shapes") / "shapesworld", 4, seed=5, prefix="t")


def selfgen_recipe(out, images, **generation) -> dict:
    # greedy on both sides (the deterministic setting), both rejected branches: hallucination prompts and
    # corrupted pixels
    sampling = {"max_new_tokens": 32}
    recipe = {"model": {"name_or_path": MODEL, "dtype": "float32"},
              "selfgen": {"output_dir": str(out), "images": {"type": "folder", "path": str(images)}, "seed": 1,
                          "hallucination_prob": 0.5, "corruptions": ["lower_resolution", "gaussian_blur"],
                          "chosen_sampling": sampling, "rejected_sampling": sampling, "images_per_part": 2,
                          "prompts": {"good_prompt_file": str(REPO / "recipes/shapesworld/careful_prompt.txt"),
                                      "caption_prompts_file": str(REPO / "recipes/shapesworld/caption_prompts.txt"),
                                      "hallucination_prompts_file":
                                          str(REPO / "recipes/shapesworld/hallucination_prompts.txt")}}}
    if generation:
        recipe["generation"] = {"backend": "openai", "max_retries": 3, "timeout": 60, **generation}
    return recipe


PAIR_COLUMNS = ("image_id", "chosen", "rejected", "rejected_branch", "corruption_params", "chosen_finish_reason",
                "rejected_finish_reason", "chosen_num_tokens", "rejected_num_tokens")


def pairs(out) -> dict:
    import pyarrow.parquet as pq

    rows = [r for p in sorted((Path(out) / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len({r["image_id"] for r in rows}) == len(rows), "duplicated rows"
    return {r["image_id"]: {k: r[k] for k in PAIR_COLUMNS} for r in rows}


@pytest.fixture(scope="module")
def local_pairs(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "selfgen"
    selfgen_run(selfgen_recipe(out, shapes / "images"))
    return pairs(out)


def test_selfgen_via_endpoint_gives_the_local_pairs(server, shapes, local_pairs, tmp_path):
    manifest = selfgen_run(selfgen_recipe(tmp_path / "out", shapes / "images", endpoints=[server], model=MODEL))
    got = pairs(tmp_path / "out")
    assert {p["rejected_branch"] for p in local_pairs.values()} == {"hallucination", "corruption"}
    assert got == local_pairs and len(got) == manifest["counts"]["rows"] >= 3
    assert manifest["last_run"]["generated_tokens"] > 0
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["generation"] == {"backend": "openai", "model": MODEL}  # a local run cannot resume into it


def test_killed_endpoint_run_resumes_without_loss_or_duplication(server, shapes, local_pairs, tmp_path,
                                                                 monkeypatch):
    from stic import store

    recipe = selfgen_recipe(tmp_path / "out", shapes / "images", endpoints=[server], model=MODEL)
    real = die_on_call(monkeypatch, store.ShardedOutput, "write_rows", 2)
    with pytest.raises(KeyboardInterrupt):
        selfgen_run(recipe)
    monkeypatch.setattr(store.ShardedOutput, "write_rows", real)
    manifest = selfgen_run(recipe)
    assert manifest["last_run"]["already_done_at_start"] == 2 and manifest["last_run"]["images_processed"] == 2
    assert pairs(tmp_path / "out") == local_pairs


def test_endpoint_dying_mid_run_leaves_the_work_to_the_others(server, shapes, local_pairs, tmp_path, stubs,
                                                              caplog):
    dying = stubs("proxy:2", target=server)  # answers two requests, then drops every connection
    # one request at a time, so the endpoints take turns (equally few in flight) and the count below is exact
    recipe = selfgen_recipe(tmp_path / "out", shapes / "images", endpoints=[dying.url, server], model=MODEL,
                            max_concurrency=1, max_endpoint_failures=2)
    with caplog.at_level("WARNING", logger="stic.serving"):
        selfgen_run(recipe)
    assert pairs(tmp_path / "out") == local_pairs
    assert dying.hits == 2 + 2  # served two, failed twice in a row, then was dropped for the rest of the run
    assert f"dropping endpoint {dying.url.rstrip('/')}" in caplog.text


def test_no_endpoint_left_stops_with_a_clear_error(shapes, tmp_path, stubs, monkeypatch):
    monkeypatch.setattr("stic.serving.backoff_seconds", lambda attempt: 0.01)
    down, closing = stubs("503"), stubs("close")
    recipe = selfgen_recipe(tmp_path / "out", shapes / "images", endpoints=[down.url, closing.url], model=MODEL,
                            max_endpoint_failures=2, max_retries=10, max_concurrency=1)
    with pytest.raises(EndpointError, match="no generation endpoint left") as info:
        selfgen_run(recipe)
    assert down.url in str(info.value) and closing.url in str(info.value) and "503" in str(info.value)
    assert down.hits == closing.hits == 2


def test_a_bad_key_stops_the_run_with_one_line(shapes, tmp_path, stubs, capsys, monkeypatch):
    from stic.cli import main

    secret = "sk-wrong-key-4242"
    monkeypatch.setenv("MY_FLEET_KEY", secret)
    refusing = stubs("401")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(selfgen_recipe(tmp_path / "out", shapes / "images", endpoints=[refusing.url],
                                                    model=MODEL, api_key_env="MY_FLEET_KEY", max_concurrency=1)))
    with pytest.raises(SystemExit) as exit_info:
        main(["selfgen", "--recipe", str(recipe)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stic: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert refusing.url.rstrip("/") in lines[0] and "$MY_FLEET_KEY" in lines[0] and "401" in lines[0]
    assert refusing.hits == 1  # never retried (one request in flight at a time here)
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert secret not in err and secret not in written


def test_busy_endpoint_is_retried_not_dropped(monkeypatch, stubs):
    from stic.config import BackendConfig
    from stic.generation import Request, SamplingConfig
    from stic.serving import OpenAIGenerator

    busy = stubs("429")
    gen = OpenAIGenerator(BackendConfig(backend="openai", endpoints=[busy.url], max_retries=2,
                                        max_endpoint_failures=1), model="m")
    monkeypatch.setattr("stic.serving.backoff_seconds", lambda attempt: 0.01)
    with pytest.raises(EndpointError, match="failed 3 times.*429"):
        gen.generate([Request(None, "hi")], SamplingConfig(max_new_tokens=2))
    assert busy.hits == 3 and gen.endpoints[0].alive  # 429 means busy, not down


def test_eval_via_endpoint_answers_as_local(server, shapes, tmp_path):
    from tests.test_eval import eval_run_module

    eval_run = eval_run_module()

    def recipe(out, **generation):
        r = {"model": {"name_or_path": MODEL, "dtype": "float32"},
             "eval": {"data_root": str(shapes.parent), "output_dir": str(out), "limit": 4, "batch_size": 4,
                      "plugins": ["stic.shapes.benchmarks"]}}
        if generation:
            r["generation"] = {"backend": "openai", **generation}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(r))
        return str(path)

    for out, gen in ((tmp_path / "local", {}), (tmp_path / "served", {"endpoints": [server], "model": MODEL})):
        assert eval_run.main(["--recipe", recipe(out, **gen), "--benchmarks", "shapes_describe,shapes_qa"]) == 0
    for bench in ("shapes_describe", "shapes_qa"):
        local, served = ((o / "base" / bench / "predictions.jsonl").read_text() for o in (tmp_path / "local",
                                                                                       tmp_path / "served"))
        assert served == local and len(local.splitlines()) == 4


def test_stage2_descriptions_via_endpoint_equal_local(server, shapes, tmp_path):
    from stic.infuse import describe_images, parse_recipe
    from stic.instructions import load_instructions

    def recipe(out, **generation):
        r = {"model": {"name_or_path": MODEL, "dtype": "float32"},
             "infuse_sft": {"output_dir": str(out), "stage1_adapter": None, "stage1_model": MODEL,
                            "adapter_mode": "new",
                            "data": {"path": str(shapes / "instructions.json"), "image_folder": str(shapes)},
                            "describe": {"sampling": {"max_new_tokens": 32}, "images_per_part": 4}}}
        if generation:
            r["generation"] = {"backend": "openai", **generation}
        return parse_recipe(r)

    local_recipe = recipe(tmp_path / "local")
    records, _ = load_instructions(local_recipe.infuse_sft.data)
    local = describe_images(local_recipe, records)
    served = describe_images(recipe(tmp_path / "served", endpoints=[server], model=MODEL), records)
    assert served == local and len(local) == 4 and all(local.values())


def test_adapters_need_a_served_merged_model(tmp_path):
    from stic.infuse import describe_images, parse_recipe

    r = parse_recipe({"infuse_sft": {"output_dir": str(tmp_path), "stage1_adapter": "outputs/dpo"},
                      "generation": {"backend": "openai", "endpoints": ["http://127.0.0.1:9/v1"]}})
    with pytest.raises(RecipeError, match="stic merge.*generation.model"):
        describe_images(r, [{"image": "a.png", "image_path": "a.png"}])


def test_generation_section_is_parsed_strictly():
    from stic.selfgen import parse_recipe

    with pytest.raises(RecipeError, match="did you mean generation.endpoints"):
        parse_recipe({"generation": {"endpoint": ["http://x/v1"]}})
    with pytest.raises(RecipeError, match="needs at least one URL"):
        parse_recipe({"generation": {"backend": "openai"}})
    assert parse_recipe({}).generation.backend == "local"


def test_a_field_the_server_refuses_stops_with_its_reason(server):
    from stic.config import BackendConfig
    from stic.generation import Request, SamplingConfig
    from stic.serving import OpenAIGenerator

    gen = OpenAIGenerator(BackendConfig(backend="openai", endpoints=[server]), model=MODEL)
    with pytest.raises(EndpointError, match="422.*top_k"):  # transformers serve has no top_k
        gen.generate([Request(None, "Describe the image.")], SamplingConfig(do_sample=True, top_k=5, max_new_tokens=2))


def test_dar_via_endpoint_equals_local(server, shapes, tmp_path, capsys):
    from stic.cli import main

    image = str(next((shapes / "images").glob("*.png")))
    outputs = []
    for name, generation in (("local", {}), ("served", {"backend": "openai", "endpoints": [server], "model": MODEL})):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({"model": {"name_or_path": MODEL, "dtype": "float32"},
                                          "infuse_sft": {"describe": {"sampling": {"max_new_tokens": 32}}},
                                          **({"generation": generation} if generation else {})}))
        with pytest.raises(SystemExit) as exit_info:
            main(["dar", "--recipe", str(recipe), "--base", "--image", image, "--question", "Is there a red circle?",
                  "--max-new-tokens", "8"])
        assert exit_info.value.code == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[0]["description"] and outputs[0]["answer"]


@pytest.mark.slow
def test_two_accelerate_processes_share_the_endpoint(server, shapes, local_pairs, tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(selfgen_recipe(tmp_path / "out", shapes / "images", endpoints=[server],
                                                    model=MODEL)))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "recipes/accelerate/ddp.yaml"), "--num_processes", "2", "--main_process_port",
              str(free_port()), "-m", "stic", "selfgen", "--recipe", str(recipe)]
    res = subprocess.run(launch, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert pairs(tmp_path / "out") == local_pairs
    parts = list((tmp_path / "out" / "data").glob("*.parquet"))
    assert {p.name.split("-")[2] for p in parts} == {"r000", "r001"}  # each process sent and wrote its shard
