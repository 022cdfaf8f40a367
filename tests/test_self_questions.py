"""Self-questioning (SQ-LLaVA): selfgen's self_questions pair source and stage 2's questioner turns."""

import json
import types
from pathlib import Path

import pytest
import torch

from stic.config import ModelSpec, RecipeError
from stic.generation import BatchGenerator, Output
from stic.models import load_processor
from stic.prompts import PromptsConfig
from stic.selfgen import SelfGenConfig, drop_reason, parse_recipe
from stic.self_questions import (ANSWER_HALLUCINATION_PROMPTS, ASK_PROMPTS, IgnoreToken, QuestionerTurns,
                                 QuestionPairGenerator, add_questioner_token, load_question_prompts,
                                 make_room_for_token, parse_question, questioner_turns, token_rows_to_train)
from tests.conftest import photo, selfgen_recipe, selfgen_rows, selfgen_run, tiny_llava

# a record after infusion: the first user turn holds the description, two later user turns follow
RECORD = [{"role": "user", "content": "Image description: a mug on a desk\nWhat is it?"},
          {"role": "assistant", "content": "A mug."},
          {"role": "user", "content": "What color?"},
          {"role": "assistant", "content": "Red."},
          {"role": "user", "content": "Where?"},
          {"role": "assistant", "content": "Desk."}]


def stage2(delta, marker="VUSER:", token=None, seed=0):
    """The infuse_sft keys questioner_turns reads."""
    return types.SimpleNamespace(self_questioning=delta, questioner_role=marker, questioner_token=token, seed=seed)


def trained_spans(processor, messages, image, collator_wrap=None):
    """The texts TRL's SFT collator (assistant_only_loss) trains on, one per contiguous run of labels."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    batch = (collator_wrap(collator) if collator_wrap else collator)([{"images": [image], "messages": messages}])
    spans, run = [], []
    for token, label in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()):
        if label != -100:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    spans += [run] if run else []
    return [processor.tokenizer.decode(s, skip_special_tokens=True).strip() for s in spans], batch


# ---------------------------------------------------------------------------------------------------------
# Stage 1 data


def test_self_question_rows_are_the_models_questions_and_load_for_stage1(tmp_path):
    from stic.dpo import load_preference_dataset
    from tests.test_dpo import dpo_cfg

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        photo(i).save(images / f"img{i}.png")
    out = tmp_path / "out"
    recipe = selfgen_recipe(out, {"type": "folder", "path": str(images)}, pair_source="self_questions",
                            questions_per_image=2, question_sampling={"max_new_tokens": 5, "do_sample": True})
    manifest = selfgen_run(recipe)
    rows = selfgen_rows(out)
    dropped = sum(manifest["counts"]["dropped_pairs"].values())
    assert len(rows) == manifest["counts"]["rows"] and len(rows) + dropped == 4 and len(rows) >= 2
    assert manifest["counts"]["duplicate_rows"] == 0 and manifest["counts"]["images_remaining"] == 0
    for row in rows:
        # the prompt is the question the model asked, asked with a prompt of the pool; both answers and how the
        # rejected one was made are kept
        assert row["prompt"] == [{"role": "user", "content": row["question"]}] and row["question"]
        assert row["question_prompt"] in ASK_PROMPTS and row["image_id"] == f"{row['source_image_id']}#q{row['question_index']}"
        assert row["chosen_prompt"] == row["question"] and row["chosen"][0]["content"]
        if row["rejected_branch"] == "hallucination":
            assert row["rejected_prompt"].startswith(row["question"] + "\n") and row["corruption_params"] is None
        else:
            assert row["rejected_prompt"] == row["question"] and json.loads(row["corruption_params"])["kind"]
    config = json.loads((out / "run_config.json").read_text())["selfgen"]
    assert config["pair_source"] == "self_questions" and config["questions_per_image"] == 2
    assert config["question_prompt_sets"]["ask"] == ASK_PROMPTS
    ds = load_preference_dataset(dpo_cfg(tmp_path, out))  # stage 1 reads them as they are
    assert len(ds) == len(rows) and ds[0]["prompt"] == rows[0]["prompt"]


class ScriptedEngine:
    """Answers each generate call with the next list of texts."""

    def __init__(self, *calls):
        self.calls, self.requests = list(calls), []

    def generate(self, requests, sampling, seed=0, on_batch=None):
        self.requests.append(list(requests))
        return [Output(text, "eos", len(text.split())) for text in self.calls.pop(0)]


def test_questions_are_parsed_one_per_generation_and_bad_ones_dropped():
    assert parse_question('  1. "Question: What color is the mug? It is red."\nIs it big?') == "What color is the mug?"
    assert parse_question("VUSER: VUSER: How many cups?", "VUSER:") == "How many cups?"
    assert parse_question("- Q2) Where is the cat") == "Where is the cat"

    cfg = SelfGenConfig(questions_per_image=3, hallucination_prob=0.5, seed=1)
    engine = ScriptedEngine(
        ["What is on the desk?", "what is on the desk", "", "Is the mug red?", "1. How many cups?", "??"],
        ["A mug.", "Yes.", "Two."],  # chosen answers to the three kept questions
        ["A mug and a cat.", "Yes.", "Five."])  # rejected: the second equals its chosen answer
    pairs = QuestionPairGenerator(engine, cfg, load_question_prompts(PromptsConfig()), "m",
                                  [{"kind": "color_jitter"}], drop_reason)
    rows, drops = pairs([("a.jpg", photo(1)), ("b.jpg", photo(2))])
    assert sorted((d["id"], d["question"], d["reason"]) for d in drops) == [
        ("a.jpg", 1, "duplicate_question"), ("a.jpg", 2, "empty_question"), ("b.jpg", 0, "identical"),
        ("b.jpg", 2, "empty_question")]
    assert [(r["image_id"], r["question"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("a.jpg#q0", "What is on the desk?", "A mug.", "A mug and a cat."),
        ("b.jpg#q1", "How many cups?", "Two.", "Five.")]
    # each kept question was answered: chosen on the clean image, rejected as its row's branch says
    asked, chosen, rejected = engine.requests
    assert [r.prompt for r in asked] == [p.ask_prompt for name in ("a.jpg", "b.jpg") for p in pairs.plans(name)]
    assert [r.prompt for r in chosen] == ["What is on the desk?", "Is the mug red?", "How many cups?"]
    assert [r.prompt for r in rejected[::2]] == [row["rejected_prompt"] for row in rows]
    for req, row in zip(rejected[::2], rows):
        assert (req.image.tobytes() == photo(1 if row["source_image_id"] == "a.jpg" else 2).tobytes()) == (
            row["rejected_branch"] == "hallucination")
    # every choice is fixed by (seed, image id, question index)
    again = QuestionPairGenerator(ScriptedEngine(), cfg, load_question_prompts(PromptsConfig()), "m",
                                  [{"kind": "color_jitter"}], drop_reason)
    assert again.plans("a.jpg") == pairs.plans("a.jpg") and pairs.plans("a.jpg") != pairs.plans("b.jpg")


def test_question_prompt_files_replace_the_pools(tmp_path):
    ask, bad = tmp_path / "ask.txt", tmp_path / "hallu.txt"
    ask.write_text("Ask about the sky.\n\nAsk about the ground.\n")
    bad.write_text("Answer wildly.\n")
    sets = load_question_prompts(PromptsConfig(question_prompts_file=str(ask)))
    assert sets.ask == ("Ask about the sky.", "Ask about the ground.")
    assert sets.hallucination == tuple(ANSWER_HALLUCINATION_PROMPTS)
    with pytest.raises(ValueError, match=r"must hold \{question\}"):
        load_question_prompts(PromptsConfig(answer_hallucination_prompts_file=str(bad)))


def test_recipe_keys_are_checked():
    with pytest.raises(RecipeError, match="questions_per_image"):
        parse_recipe({"selfgen": {"pair_source": "self_questions", "questions_per_image": 0}})
    with pytest.raises(RecipeError, match="consistency_samples"):
        parse_recipe({"selfgen": {"pair_source": "self_questions", "consistency_samples": 3}})
    with pytest.raises(RecipeError, match="questioner_role"):
        parse_recipe({"selfgen": {"pair_source": "self_questions", "questioner_role": " "}})
    from stic.infuse import parse_recipe as parse_stage2

    with pytest.raises(RecipeError, match="self_questioning must lie in"):
        parse_stage2({"infuse_sft": {"self_questioning": 1.5}})
    with pytest.raises(RecipeError, match="nothing would use the token"):
        parse_stage2({"infuse_sft": {"questioner_token": "[vusr]"}})


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "idefics3"])
def test_questioner_role_starts_the_answer_as_stage2_renders_the_questioner_turn(family):
    processor = load_processor(ModelSpec(name_or_path=f"tiny:{family}"))
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=processor.tokenizer.eos_token_id))
    engine = BatchGenerator(model, processor)
    image = photo(3)
    asked = engine.prompt_text("Ask a question.", image, answer_prefix="VUSER:")
    from trl.data_utils import prepare_multimodal_messages

    trained = processor.apply_chat_template(prepare_multimodal_messages(
        [{"role": "user", "content": "Ask a question."}, {"role": "assistant", "content": "VUSER: Is it red?"}],
        images=[image]), tokenize=False)
    assert asked.endswith("VUSER:") and trained.startswith(asked)
    assert engine.prompt_text("Ask a question.", image) != asked  # without a prefix: the plain generation prompt


# ---------------------------------------------------------------------------------------------------------
# Stage 2


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "idefics3"])
def test_loss_mask_trains_questioner_questions_and_answers_only(family):
    processor = load_processor(ModelSpec(name_or_path=f"tiny:{family}"))
    # for record "r2" the seeded draw turns the second user turn into a questioner turn and keeps the third
    messages, turned = QuestionerTurns(0.5, "VUSER:", 0).apply(RECORD, "r2")
    assert turned == 1 and messages[2] == {"role": "assistant", "content": "VUSER: What color?"}
    assert messages[4] == RECORD[4]
    spans, _ = trained_spans(processor, messages, photo(4))
    # the questioner's question (with its marker) and every answer are targets; the image, the description, the
    # first instruction and the user's ordinary turn are not
    assert spans == ["A mug.", "VUSER: What color?", "Red.", "Desk."], family
    plain, _ = trained_spans(processor, RECORD, photo(4))
    assert plain == ["A mug.", "Red.", "Desk."], family  # without self-questioning no question is trained


def test_questioner_turns_are_seeded_per_record_and_delta_zero_changes_nothing(tmp_path):
    from stic.infuse import build_training_set

    assert questioner_turns(stage2(0.0)) is None
    import io

    png = io.BytesIO()
    photo(0, size=(8, 8)).save(png, format="PNG")
    records = [{"id": f"r{i}", "image": f"{i}.jpg", "image_bytes": png.getvalue(), "messages": RECORD}
               for i in range(200)] + [{"id": "text", "image": None, "messages": RECORD}]
    descriptions = {f"{i}.jpg": "a mug" for i in range(200)}
    plain, _ = build_training_set(records, descriptions, "{description}\n{instruction}")
    off, _ = build_training_set(records, descriptions, "{description}\n{instruction}", None,
                                questioner_turns(stage2(0.0)))
    assert off["messages"] == plain["messages"]
    turns = questioner_turns(stage2(0.5, token="[vusr]"))
    assert turns.marker == "[vusr]"  # a token, when the recipe adds one, is the marker
    on, _ = build_training_set(records, descriptions, "{description}\n{instruction}", None, turns)
    again, _ = build_training_set(list(reversed(records)), descriptions, "{description}\n{instruction}", None, turns)
    assert {r["id"]: r["messages"] for r in on} == {r["id"]: r["messages"] for r in again}  # per record, not order
    questioner = [m for r in on if r["id"] != "text" for m in r["messages"][2::2] if m["content"].startswith("[vusr] ")]
    assert 0.4 < len(questioner) / 400 < 0.6  # delta of the 400 later user turns
    assert on[200]["messages"] == plain[200]["messages"]  # a text-only record keeps its turns
    assert all(r["messages"][0] == plain[0]["messages"][0] for r in on.select(range(3)))  # the first turn never
    counts = turns.count(records[:200])
    assert counts["later_user_turns"] == 400 and counts["questioner_turns"] == len(questioner)


def test_a_questioner_token_grows_the_embeddings_and_trains_only_its_input_row():
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_llava()
    rows, known = model.get_input_embeddings().weight.shape[0], len(processor.tokenizer)
    token_id = add_questioner_token(processor, "[vusr]")
    assert token_id == known and processor.tokenizer.convert_tokens_to_ids("[vusr]") == token_id
    done = make_room_for_token(model, token_id, known)
    assert done == {"rows_before": rows, "rows": rows + 1}
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embeddings.shape[0] == head.shape[0] == rows + 1
    assert torch.allclose(embeddings[token_id], embeddings[:known].mean(0))  # starts at the mean, deterministically
    indices = token_rows_to_train(model, token_id)
    assert indices == {"model.language_model.embed_tokens": [token_id]}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                  trainable_token_indices=indices))
    messages, _ = QuestionerTurns(1.0, "[vusr]", 0).apply(RECORD, "r0")
    spans, batch = trained_spans(processor, messages, photo(5), lambda c: IgnoreToken(c, token_id))
    assert (batch["input_ids"] == token_id).sum() == 2  # one token, not split into pieces
    assert spans == ["A mug.", "What color?", "Red.", "Where?", "Desk."]  # the token itself is no target
    peft_model(**batch).loss.backward()
    delta = next(p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n)
    assert delta.shape == (1, embeddings.shape[1]) and delta.grad is not None and delta.grad.abs().sum() > 0
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert not [n for n in trainable if "embed_tokens" in n and "trainable_tokens" not in n]
    assert not [n for n in trainable if "lm_head" in n]


@pytest.mark.slow
def two_turn_mix(tmp_path):
    """Four two-turn instruction records on two images: each later turn can become a questioner turn."""
    from stic.instructions import InstructionDataConfig
    from tests.conftest import conv

    (tmp_path / "img").mkdir()
    for i in range(2):
        photo(20 + i, size=(56, 48)).save(tmp_path / "img" / f"{i}.jpg")
    records = [{"id": f"r{i}", "image": f"{i % 2}.jpg",
                "conversations": conv(f"<image>\nWhat is block {i}?", "Red.", "And the background?", "A gradient.")}
               for i in range(4)]
    (tmp_path / "mix.json").write_text(json.dumps(records))
    return InstructionDataConfig(path=str(tmp_path / "mix.json"), image_folder=str(tmp_path / "img"))


def test_stage2_with_a_questioner_token_runs_and_its_model_loads_for_inference(tmp_path):
    """A continued stage-1 adapter gains the token's row; the adapter, the merged folder and inference hold it."""
    from stic.infuse import Recipe, run_infuse_sft
    from stic.models import load_for_inference, merge_adapter
    from tests.conftest import make_adapter
    from tests.test_infuse import stage2_cfg

    data = two_turn_mix(tmp_path)
    adapter = make_adapter(tmp_path / "stage1")
    cfg = stage2_cfg(tmp_path, data, adapter, self_questioning=1.0, questioner_token="[vusr]", max_steps=2)
    cfg.subset.size = 4
    base = ModelSpec(name_or_path="tiny:llava", dtype="float32")
    summary = run_infuse_sft(Recipe(model=base, infuse_sft=cfg))
    assert summary["self_questioning"]["questioner_turns"] == 4 and summary["self_questioning"]["token_id"] == 936
    out = Path(cfg.output_dir)
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "model.language_model.embed_tokens": [936]}
    model, processor = load_for_inference(base, [str(out)], "cpu")
    start = tiny_llava()[0].get_input_embeddings().weight[:936].mean(0)
    row = model.get_input_embeddings().weight[936]
    assert processor.tokenizer.convert_tokens_to_ids("[vusr]") == 936 and not torch.allclose(row, start)
    merged, _ = merge_adapter(base, str(out), str(tmp_path / "merged"), dtype="float32")
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(merged).tokenizer.convert_tokens_to_ids("[vusr]") == 936


# each family's input embeddings, where a questioner token's row lives
EMBEDDINGS = {"llava_next": "model.language_model.embed_tokens", "qwen2_5_vl": "model.language_model.embed_tokens",
              "idefics3": "model.text_model.embed_tokens"}


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "idefics3"])
def test_stage2_self_questioning_with_a_token_on_each_family(tmp_path, family):
    """The other three families: stage 2 with questioner turns and an added token trains that token's row of the
    family's own input embeddings, and the adapter loads for inference with the token."""
    from stic.infuse import Recipe, run_infuse_sft
    from stic.models import load_for_inference, load_model
    from tests.conftest import make_adapter
    from tests.test_infuse import stage2_cfg

    data = two_turn_mix(tmp_path)
    cfg = stage2_cfg(tmp_path, data, make_adapter(tmp_path / "stage1", family), self_questioning=1.0,
                     questioner_token="[vusr]", max_steps=1, lora_dropout=0.0)
    cfg.subset.size = 4
    base = ModelSpec(name_or_path=f"tiny:{family}", dtype="float32")
    summary = run_infuse_sft(Recipe(model=base, infuse_sft=cfg))
    token = summary["self_questioning"]["token_id"]
    assert summary["self_questioning"]["questioner_turns"] == 4
    out = Path(cfg.output_dir)
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"] == {
        EMBEDDINGS[family]: [token]}
    model, processor = load_for_inference(base, [str(out)], "cpu")
    assert processor.tokenizer.convert_tokens_to_ids("[vusr]") == token
    before = load_model(base).get_input_embeddings().weight
    after = model.get_input_embeddings().weight
    assert after.shape[0] > token and not torch.equal(after[token], before[:token].mean(0))
    assert torch.equal(after[:token], before[:token])  # no other row moved
