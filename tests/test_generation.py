import pytest
import torch

from stic.config import ModelSpec
from stic.generation import BatchGenerator, Request, RowSampler, SamplingConfig, stable_seed
from stic.models import load_model, load_processor
from stic.tiny import FAMILIES
from tests.conftest import photo


def engine(family, batch_size=4, **kw):
    cfg = ModelSpec(name_or_path=f"tiny:{family}", dtype="float32")
    return BatchGenerator(load_model(cfg), load_processor(cfg), batch_size=batch_size, **kw)


def requests():
    prompts = ["Describe the image.", "What is shown in this picture, in detail?", "Tell me about it.",
               "Describe the contents of this picture in detail please.", "What can you see?"]
    return [Request(photo(i, size=(60 + 20 * i, 50 + 10 * (i % 2))), p) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_prompt_is_the_training_prompt(family):
    """The tokens and pixels generation conditions on are those TRL's DPO collator builds for the same row."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    eng = engine(family)
    image, prompt = photo(7, size=(90, 70)), "Describe the image."
    row = {"images": [image], "prompt": [{"role": "user", "content": prompt}],
           "chosen": [{"role": "assistant", "content": "a cat"}],
           "rejected": [{"role": "assistant", "content": "a dog"}]}
    batch = DataCollatorForVisionPreference(eng.processor)([row])
    keep = (batch["attention_mask"][0] == 1) & (batch["completion_mask"][0] == 0)
    train_prompt = batch["input_ids"][0][keep]
    gen = eng.encode([Request(image, prompt)])
    gen_prompt = gen["input_ids"][0][gen["attention_mask"][0] == 1]
    assert torch.equal(train_prompt, gen_prompt)
    n = gen["pixel_values"].shape[0]
    assert torch.equal(batch["pixel_values"][:n], gen["pixel_values"])


def test_batched_greedy_matches_one_at_a_time():
    reqs = requests()
    sampling = SamplingConfig(max_new_tokens=8)
    batched = engine("llava", batch_size=4).generate(reqs, sampling)
    single = engine("llava", batch_size=1, group_by_length=False).generate(reqs, sampling)
    assert [o.text for o in batched] == [o.text for o in single]
    assert all(o.finish_reason == "length" and o.num_tokens == 8 for o in batched)


def test_batched_generation_works_for_every_family():
    for family in FAMILIES:
        outs = engine(family, batch_size=3).generate(requests(), SamplingConfig(max_new_tokens=5, do_sample=True))
        assert len(outs) == 5 and all(o.num_tokens <= 5 for o in outs), family


def test_finish_reason_eos_is_detected():
    eng = engine("llava", batch_size=2)
    reqs = requests()[:2]
    sampling = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=2.0)
    # what the engine samples for its first request with seed 0 (greedy over the row sampler's draw)
    first = eng.model.generate(**eng.encode(reqs[:1]), **SamplingConfig(max_new_tokens=8).generate_kwargs(),
                               logits_processor=[RowSampler([stable_seed(0, 0)], sampling, "cpu")],
                               pad_token_id=eng.pad_id)
    new = first[0, -8:].tolist()
    # make the first token that has not appeared before the end-of-sequence token
    k = next(i for i in range(1, 8) if new[i] not in new[:i])
    eng.model.generation_config.eos_token_id = new[k]
    eng = BatchGenerator(eng.model, eng.processor, batch_size=2)
    out = eng.generate(reqs[:1], sampling, seed=0)[0]
    assert out.finish_reason == "eos" and out.num_tokens == k
    assert out.text == eng.processor.tokenizer.decode(new[:k], skip_special_tokens=True).strip()


def test_sampling_is_reproducible_for_a_seed():
    eng = engine("llava", batch_size=3)
    s = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=1.5)
    a = [o.text for o in eng.generate(requests(), s, seed=3)]
    b = [o.text for o in eng.generate(requests(), s, seed=3)]
    c = [o.text for o in eng.generate(requests(), s, seed=4)]
    assert a == b and a != c


def test_a_requests_sample_does_not_depend_on_its_batch():
    """Each request samples from its own seeded stream: batch size, order and neighbours change nothing."""
    reqs = [Request(r.image, r.prompt, seed=100 + i) for i, r in enumerate(requests())]
    s = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, top_k=50)
    by4 = [o.text for o in engine("llava", batch_size=4).generate(reqs, s)]
    by1 = [o.text for o in engine("llava", batch_size=1, group_by_length=False).generate(reqs, s)]
    alone = engine("llava", batch_size=2).generate(reqs[3:1:-1], s)  # other neighbours, reversed
    assert by4 == by1 and [o.text for o in alone] == [by4[3], by4[2]]
    assert len(set(by4)) > 1


def test_row_sampler_applies_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    draws = lambda **kw: {int(RowSampler([i], SamplingConfig(do_sample=True, **kw), "cpu")(None, logits).argmax())
                          for i in range(200)}
    assert draws(top_k=2) == {0, 1}
    # probabilities at T=1: .64 .24 .09 .03 .01; top_p 0.8 keeps the first two, 0.9 the first three
    assert draws(top_p=0.8) == {0, 1} and draws(top_p=0.9) == {0, 1, 2}
    assert draws(temperature=5.0) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_logprobs_are_the_log_probs_training_computes(family):
    """The tokens answer_logprobs scores are the completion tokens of TRL's DPO collator, with the log-probs of a
    forward over its batch, and a score does not change with the batch it is computed in."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    eng = engine(family, batch_size=3)
    image, prompt, answers = photo(7, size=(90, 70)), "Describe the image.", ["a red cat. two dogs!", "blue sky"]
    row = {"images": [image], "prompt": [{"role": "user", "content": prompt}],
           "chosen": [{"role": "assistant", "content": answers[0]}],
           "rejected": [{"role": "assistant", "content": answers[1]}]}
    batch = DataCollatorForVisionPreference(eng.processor)([row])
    mask = batch.pop("completion_mask")[:, 1:].bool()
    with torch.no_grad():
        logits = eng.model(**batch).logits[:, :-1].float()
    trained = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    other = requests()[3]  # a longer prompt on another image size beside them in the batch
    scored = eng.answer_logprobs([Request(image, prompt), other, Request(image, prompt)],
                                 [answers[0], "a long answer about something else entirely", answers[1]])
    for i, s in zip((0, 1), (scored[0], scored[2])):
        assert torch.allclose(s.token_logprobs, trained[i][mask[i]], atol=1e-4)
        alone = eng.answer_logprobs([Request(image, prompt)], [answers[i]])[0]
        assert torch.allclose(s.token_logprobs, alone.token_logprobs, atol=1e-5)
    assert "".join(answers[0][a:b] for a, b in scored[0].spans) == answers[0]  # the spans tile the answer
