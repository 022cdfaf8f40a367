"""Batched generation for image + prompt requests.

Prompts are rendered exactly as TRL renders them for training (TRL's `prepare_multimodal_messages` and the
processor's own chat template, no extra special tokens), so a description is generated from the same token
sequence that the trainer later conditions on. Requests are sorted by length before batching to limit
padding, batches are left-padded, and each output records why it stopped (EOS or the length limit).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

import torch
from PIL import Image

from stic.config import option


@dataclasses.dataclass
class SamplingConfig:
    max_new_tokens: int = option(256, help="answer length limit in tokens")
    do_sample: bool = option(False, help="sample; false: greedy decoding")
    temperature: float = option(1.0, help="sampling temperature")
    top_p: float = option(1.0, help="nucleus sampling: keep the smallest token set with this probability mass")
    top_k: int | None = option(None, help="keep only the k most likely tokens; None: no limit")
    repetition_penalty: float = option(1.0, help="HF's repetition penalty; 1.0: none")

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be at least 0, got {self.temperature}")
        if self.do_sample and self.temperature == 0:
            raise ValueError("temperature must be positive when do_sample is true")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be at least 0 (0 or null: no limit), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
        else:  # keep greedy decoding free of the model's own sampling defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclasses.dataclass
class Request:
    image: Image.Image | None
    prompt: str
    # seeds this request's own sampling stream (selfgen: from seed and image id), so what is sampled for it does
    # not depend on which other requests share its batch; None: from the call's seed and the request's position
    seed: int | None = None
    # the start of the answer, already written (self-questioning: the questioner marker); the output is what follows
    answer_prefix: str = ""


@dataclasses.dataclass
class Output:
    text: str
    finish_reason: str  # "eos" or "length"
    num_tokens: int


@dataclasses.dataclass
class AnswerLogprobs:
    """The log-probs of an answer's completion tokens, and each token's character span in the answer (empty for the
    template's tokens; None when the tokenizer gives no offsets)."""

    token_logprobs: torch.Tensor
    spans: list[tuple[int, int]] | None

    @property
    def total(self) -> float:
        return float(self.token_logprobs.sum())


def prompt_messages(prompt: str, system_prompt: str | None = None) -> list[dict]:
    """The prompt column of a training row: [system,] user. Generation renders the same messages."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


def conversation(prompt: str, image: Image.Image | None, system_prompt: str | None = None) -> list[dict]:
    """The prompt in the structured form TRL's collators build from a {prompt, images} row."""
    from trl.data_utils import prepare_multimodal_messages

    return prepare_multimodal_messages(prompt_messages(prompt, system_prompt), images=[image] if image else [])


def stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


class RowSampler:
    """Samples each row of a batch from its own generator (temperature, top-k, top-p as HF applies them).

    Runs as the last logits processor of a greedy `generate`: it draws the token itself and leaves only that
    token finite, so the argmax takes it. With one generator per request, a request's sample depends on its own
    seed, not on the batch it happens to be in (a resume with another batch size gives the same pairs)."""

    def __init__(self, seeds: list[int], sampling: SamplingConfig, device=None):
        self.sampling, self.seeds = sampling, seeds
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids, scores):
        if self.generators is None:  # on the logits' device (with a device_map it need not be the model's first)
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        s = self.sampling
        logits = scores.float() / s.temperature
        if s.top_k:
            kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cum - sorted_logits.softmax(-1) >= s.top_p
            drop_sorted[..., 0] = False  # the most likely token always stays (top_p 0 means greedy)
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        probs = logits.softmax(-1)
        picked = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, picked[:, None], 0.0)


class BatchGenerator:
    def __init__(self, model, processor, batch_size: int = 8, group_by_length: bool = True,
                 system_prompt: str | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model, self.processor = model, processor
        self.batch_size, self.group_by_length = batch_size, group_by_length
        self.system_prompt = system_prompt
        tok = processor.tokenizer
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids))

    def prompt_text(self, prompt: str, image: Image.Image | None, answer_prefix: str = "") -> str:
        messages = conversation(prompt, image, self.system_prompt)
        if not answer_prefix:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # an assistant turn rendered as training renders one, left open after the prefix
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer_prefix}]})
        return self.processor.apply_chat_template(messages, continue_final_message=True, tokenize=False)

    def encode(self, requests: Sequence[Request], padding_side: str = "left") -> dict:
        """Model inputs for a batch, left-padded, exactly as generation sees them."""
        texts = [self.prompt_text(r.prompt, r.image, r.answer_prefix) for r in requests]
        images = [[r.image] if r.image is not None else [] for r in requests]
        kwargs = {"images": images} if any(images) else {}
        return self.processor(text=texts, padding=True, padding_side=padding_side, return_tensors="pt",
                              add_special_tokens=False, **kwargs)

    def completion_text(self, prompt: str, image: Image.Image | None, answer: str) -> str:
        """`answer` as training reads it: what the chat template writes after the prompt for an assistant turn
        holding it, turn-end tokens included (TRL's DPO collator takes the completion the same way)."""
        messages = conversation(prompt, image, self.system_prompt)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        full = self.processor.apply_chat_template(messages, tokenize=False)
        head = self.prompt_text(prompt, image)
        return full[len(head):] if full.startswith(head) else answer

    @torch.inference_mode()
    def answer_logprobs(self, requests: Sequence[Request], answers: Sequence[str]) -> list[AnswerLogprobs]:
        """log p(token | prompt, image, earlier tokens) for every token of each answer's completion.

        Each prompt + completion is packed from position 0 with padding only at the right end (as TRL's collator
        flushes it left), so, with causal attention, a score does not depend on the batch it was computed in."""
        tok = self.processor.tokenizer
        device = self.model.device
        results: list[AnswerLogprobs] = []
        for start in range(0, len(requests), self.batch_size):
            batch = list(requests[start:start + self.batch_size])
            texts = list(answers[start:start + self.batch_size])
            encoded = self.encode(batch, padding_side="right")
            prompt_lens = encoded["attention_mask"].sum(1).tolist()
            completions = [self.completion_text(r.prompt, r.image, a) for r, a in zip(batch, texts)]
            pieces = [tok(c, add_special_tokens=False, return_offsets_mapping=tok.is_fast) for c in completions]
            ids = [p["input_ids"] for p in pieces]
            width = max(p + len(c) for p, c in zip(prompt_lens, ids))
            inputs = dict(encoded)
            for key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
                if key not in encoded:
                    continue
                packed = torch.full((len(batch), width), self.pad_id if key == "input_ids" else 0,
                                    dtype=encoded[key].dtype)
                for i, (p, c) in enumerate(zip(prompt_lens, ids)):
                    packed[i, :p] = encoded[key][i, :p]
                    packed[i, p:p + len(c)] = torch.tensor(c) if key == "input_ids" else int(key == "attention_mask")
                inputs[key] = packed
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            first = min(prompt_lens) - 1  # the logits of the first completion token sit at its prompt's last position
            logits = self.model(**inputs, use_cache=False, logits_to_keep=width - first).logits.float()
            logps = logits.log_softmax(-1)
            for i, (p, c, piece, completion, answer) in enumerate(zip(prompt_lens, ids, pieces, completions, texts)):
                rows = torch.arange(p - 1, p - 1 + len(c), device=logps.device) - first
                picked = logps[i, rows].gather(-1, torch.tensor(c, device=logps.device)[:, None])[:, 0].cpu()
                at = completion.find(answer) if answer else -1
                clip = lambda x: min(max(x - at, 0), len(answer))  # noqa: E731  (template text: an empty span)
                spans = [(clip(a), clip(b)) for a, b in piece["offset_mapping"]] if at >= 0 and tok.is_fast else None
                results.append(AnswerLogprobs(picked, spans))
        return results

    def _order(self, requests: Sequence[Request]) -> list[int]:
        if not self.group_by_length:
            return list(range(len(requests)))
        tok = self.processor.tokenizer
        lengths = [len(tok(r.prompt, add_special_tokens=False)["input_ids"]) for r in requests]
        pixels = [r.image.width * r.image.height if r.image is not None else 0 for r in requests]
        # prompt length first, then image size, which sets the number of image tokens on dynamic-resolution models
        return sorted(range(len(requests)), key=lambda i: (lengths[i], pixels[i]))

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], sampling: SamplingConfig, seed: int = 0,
                 on_batch: Callable[[int, int], None] | None = None) -> list[Output]:
        """Outputs in request order. `on_batch(n_requests, n_new_tokens)` reports progress."""
        order = self._order(requests)
        outputs: list[Output | None] = [None] * len(requests)
        device = self.model.device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            inputs = self.encode([requests[i] for i in idx]).to(device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            kwargs = sampling.generate_kwargs()
            if sampling.do_sample:  # each request samples from its own stream (see RowSampler)
                seeds = [requests[i].seed if requests[i].seed is not None else stable_seed(seed, i) for i in idx]
                kwargs = SamplingConfig(max_new_tokens=sampling.max_new_tokens,
                                        repetition_penalty=sampling.repetition_penalty).generate_kwargs()
                kwargs["logits_processor"] = [RowSampler(seeds, sampling, device)]
            out = self.model.generate(**inputs, **kwargs, pad_token_id=self.pad_id)
            new = out[:, inputs["input_ids"].shape[1]:].tolist()
            n_tokens = 0
            for i, ids in zip(idx, new):
                stop = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
                keep = ids if stop is None else ids[:stop]
                text = self.processor.tokenizer.decode(keep, skip_special_tokens=True).strip()
                outputs[i] = Output(text, "length" if stop is None else "eos", len(keep))
                n_tokens += len(keep) + (stop is not None)
            if on_batch:
                on_batch(len(idx), n_tokens)
        return outputs
