"""Special tokens as the real families were trained with them: BOS first, EOS after every trained answer.

The tiny models' templates render what the published checkpoints' templates render (llava-hf/llava-1.5-7b-hf,
llava-hf/llava-v1.6-mistral-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct, SmolVLM), and their tokenizers add BOS by
themselves exactly where the real ones do (the Llama/Mistral tokenizers of the two LLaVAs).
"""

from importlib.resources import files

import pytest
import torch
from transformers import AutoProcessor

from stic.config import ModelSpec
from stic.generation import BatchGenerator, Request, prompt_messages
from stic.models import load_model, load_processor, resolve_model_path
from stic.tiny import FAMILIES
from tests.conftest import photo

BOS_FAMILIES = ("llava", "llava_next")  # tokenizers that add <s>; the others' sequences start without a BOS
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def raw_processor(family):
    """The processor as saved, before the toolkit adjusts its template."""
    return AutoProcessor.from_pretrained(resolve_model_path(f"tiny:{family}"))


def messages(image):
    from trl.data_utils import prepare_multimodal_messages

    return prepare_multimodal_messages([{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q?"},
                                        {"role": "assistant", "content": "A."}], images=[image])


def test_tiny_templates_and_tokenizers_behave_as_published():
    image = photo(0)
    llava = raw_processor("llava")
    # llava-1.5's published template: no BOS, a space (not EOS) after the answer, the system text bare
    assert llava.apply_chat_template(messages(image), tokenize=False) == "SYS USER: <image>\nQ? ASSISTANT: A. "
    assert llava.apply_chat_template(messages(image)[1:2], tokenize=False,
                                     add_generation_prompt=True) == "USER: <image>\nQ? ASSISTANT:"
    published = {"llava_next": "llava_next", "qwen2_5_vl": "qwen2_5_vl", "idefics3": "smolvlm"}
    for family, name in published.items():
        text = files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()
        assert raw_processor(family).chat_template == text, family
    for family in FAMILIES:
        tok = raw_processor(family).tokenizer
        adds_bos = tok("a")["input_ids"][0] == tok.bos_token_id
        assert adds_bos == (family in BOS_FAMILIES), family


def engine(family, system_prompt=None):
    cfg = ModelSpec(name_or_path=f"tiny:{family}", dtype="float32")
    return BatchGenerator(load_model(cfg), load_processor(cfg), system_prompt=system_prompt)


def dpo_batch(processor, prompt):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    row = {"images": [photo(3)], "prompt": prompt, "chosen": [{"role": "assistant", "content": "a red cup"}],
           "rejected": [{"role": "assistant", "content": "a blue dog"}]}
    return DataCollatorForVisionPreference(processor)([row])


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_and_both_stages_start_as_the_model_was_trained(family):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    eng = engine(family)
    tok = eng.processor.tokenizer
    gen = eng.encode([Request(photo(1), "Describe the image.")])["input_ids"][0]
    dpo = dpo_batch(eng.processor, prompt_messages("Describe the image."))
    sft = DataCollatorForVisionLanguageModeling(eng.processor, assistant_only_loss=True)(
        [{"images": [photo(2)], "messages": [{"role": "user", "content": "What is it?"},
                                             {"role": "assistant", "content": "A cup."}]}])
    dpo_ids = dpo["input_ids"][0][dpo["attention_mask"][0] == 1]  # chosen row, padding removed
    sft_ids = sft["input_ids"][0][sft["attention_mask"][0] == 1]
    for ids in (gen, dpo_ids, sft_ids):
        ids = ids.tolist()
        if family in BOS_FAMILIES:
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        elif tok.bos_token_id is not None and family == "idefics3":
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # SmolVLM's template emits it


def eos_ids(processor, model):
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {processor.tokenizer.eos_token_id}


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_answers_end_with_eos(family):
    """Stage 1's chosen (and rejected) answers and stage 2's assistant turns are trained to stop."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    eng = engine(family)
    tok = eng.processor.tokenizer
    stops = eos_ids(eng.processor, eng.model)
    if family == "llava":  # the fault: llava-1.5's published template trains answers that never stop
        raw = dpo_batch(raw_processor(family), prompt_messages("Describe the image."))
        assert not set(raw["input_ids"][0][raw["completion_mask"][0] == 1].tolist()) & stops
    batch = dpo_batch(eng.processor, prompt_messages("Describe the image."))
    for row in range(2):  # chosen, rejected
        completion = batch["input_ids"][row][batch["completion_mask"][row] == 1].tolist()
        at = max(i for i, t in enumerate(completion) if t in stops)
        assert tok.decode(completion[at + 1:]).strip() == "", family  # at most whitespace after the EOS
    sft = DataCollatorForVisionLanguageModeling(eng.processor, assistant_only_loss=True)(
        [{"images": [photo(2)], "messages": [{"role": "user", "content": "What is it?"},
                                             {"role": "assistant", "content": "A cup."}]}])
    labels = sft["labels"][0][sft["labels"][0] != -100].tolist()
    assert tok.decode(labels).strip().startswith("A cup.") and any(t in stops for t in labels), family


def test_system_prompt_reaches_generation_and_training_alike():
    eng = engine("llava", system_prompt=VICUNA)
    gen = eng.encode([Request(photo(3), "Describe the image.")])
    batch = dpo_batch(eng.processor, prompt_messages("Describe the image.", VICUNA))
    keep = (batch["attention_mask"][0] == 1) & (batch["completion_mask"][0] == 0)
    assert torch.equal(batch["input_ids"][0][keep], gen["input_ids"][0][gen["attention_mask"][0] == 1])
    text = eng.processor.tokenizer.decode(gen["input_ids"][0])
    # LLaVA's conv_vicuna_v1 format: "<s>{system} USER: <image>\n{prompt} ASSISTANT:"
    assert text.startswith("<s>" + VICUNA + " USER: <image>") and text.endswith("Describe the image. ASSISTANT:")


def test_selfgen_and_stage2_rows_carry_the_system_prompt():
    from stic.infuse import infuse_record

    record = {"id": "r", "image": "a.jpg", "image_path": "/a.jpg",
              "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
    infused = infuse_record(record, "a cup", "Image description: {description}\n{instruction}", VICUNA)
    assert infused["messages"][0] == {"role": "system", "content": VICUNA}
    assert infused["messages"][1]["content"] == "Image description: a cup\nQ?"
    assert prompt_messages("Describe.", VICUNA)[0]["role"] == "system"
