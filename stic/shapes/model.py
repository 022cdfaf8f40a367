"""The ShapesWorld toy VLM: a ~1M-parameter LlavaForConditionalGeneration, pretrained from scratch on a CPU.

    stic shapes pretrain -o models/shapesworld-base [--steps 1500] [--seed 0]

The tokenizer is word-level over the world's closed vocabulary (built offline with `tokenizers`), the image
processor is CLIP's at 48 px, and the chat template is LLaVA-1.5's turn format. Pretraining mixes noisy
captions (the world's co-occurrence bias), imaginative captions (so hallucination prompts work) and
question answering; the learning rate decays to a tenth by the end, so the checkpoint is annealed.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from stic.shapes import world as W

# The toy VLM's chat template: LLaVA's USER/ASSISTANT turns, each answer closed by EOS (`ASSISTANT: answer</s>`,
# as LLaVA trains), string or structured content. The committed base checkpoint carries it.
_SHAPES_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SPECIALS = ["[UNK]", "<s>", "</s>", "<pad>", "<image>"]
EXTRA_WORDS = """USER ASSISTANT : , . ? image description Image Describe describe carefully object by
imaginatively an empty scene How many objects are there What color is Where Is yes no nothing""".split()


def vocabulary(world: W.World | None = None) -> list[str]:
    w = world or W.DEFAULT
    words = set(EXTRA_WORDS)
    for text in [W.describe([W.Obj(n, s, c) for n in w.type_names() for s in W.SIZES for c in range(9)]),
                 w.prompts.describe, w.prompts.careful, w.prompts.imagine, " ".join(W.NUMBER_WORDS),
                 " ".join(W.POSITIONS), " ".join(w.colors)]:
        words.update(text.replace(",", " , ").replace(".", " . ").replace("?", " ? ").split())
    return SPECIALS + sorted(words - set(SPECIALS))


def build_processor(world: W.World | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    world = world or W.DEFAULT
    vocab = {w: i for i, w in enumerate(vocabulary(world))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)  # matched whole, before the whitespace/punctuation split
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", clean_up_tokenization_spaces=True)
    size = world.image.size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=world.image.cell,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=_SHAPES_TEMPLATE)


def build_model(processor, seed: int = 0, world: W.World | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    image = (world or W.DEFAULT).image
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=image.size, patch_size=image.cell,
                                       projection_dim=96),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=160, intermediate_size=320, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _example(rng: random.Random, world: W.World | None = None):
    """One pretraining example, (image, prompt, answer), from the world's mixture of data sources: noisy
    captions under the normal prompt, careful descriptions under the careful prompt, imaginative answers under
    the imaginative prompt, and QA."""
    w = world or W.DEFAULT
    src = w.sources
    scene = W.sample_scene(rng, "pre", world=w)
    image = W.render(scene, w)
    r = rng.random()
    if r < src.captions.share:
        return image, w.prompts.describe, W.pretraining_caption(scene, rng, world=w)
    if r < src.captions.share + src.careful.share:
        return image, w.prompts.careful, W.careful_description(scene, rng, w)
    if r < src.captions.share + src.careful.share + src.imaginative.share:
        return image, w.prompts.imagine, W.imaginative_caption(scene, rng, w)
    q, a = W.qa_pairs(scene, rng, 1, w)[0]
    return image, q, a


class Collator:
    """Model inputs with the loss on the answer tokens only (prompt and image tokens masked). Texts come from
    the processor's chat template, rendered once per distinct prompt (the answers are spliced in)."""

    SLOT = "ANSWERSLOT"

    def __init__(self, processor):
        self.processor = processor
        self._cache: dict[str, tuple[str, int]] = {}

    def _template(self, prompt: str, image) -> tuple[str, int]:
        if prompt not in self._cache:
            from trl.data_utils import prepare_multimodal_messages

            p = self.processor
            user = prepare_multimodal_messages([{"role": "user", "content": prompt}], images=[image])
            full = prepare_multimodal_messages([{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": self.SLOT}], images=[image])
            user_text = p.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            n_prompt = int(p(text=[user_text], images=[[image]], add_special_tokens=False,
                             return_tensors="pt")["attention_mask"].sum())
            self._cache[prompt] = (p.apply_chat_template(full, tokenize=False), n_prompt)
        return self._cache[prompt]

    def __call__(self, examples):
        texts, images, prompt_lens = [], [], []
        for image, prompt, answer in examples:
            template, n = self._template(prompt, image)
            texts.append(template.replace(self.SLOT, answer))
            images.append([image])
            prompt_lens.append(n)
        batch = self.processor(text=texts, images=images, padding=True, padding_side="right", return_tensors="pt",
                               add_special_tokens=False)
        labels = batch["input_ids"].clone()
        for i, n in enumerate(prompt_lens):
            labels[i, :n] = -100
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch


def example_mean_loss(model, batch) -> torch.Tensor:
    """Cross-entropy averaged over each example's answer tokens, then over examples: a one-token presence answer
    counts as much as a 25-token caption, as the data mixture's shares say."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    target = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                  reduction="none")
    counts = (target != -100).sum(1).clamp(min=1)
    return (per_token.sum(1) / counts).mean()


def pretrain(out_dir: str | Path, steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
             seed: int | None = None, log_every: int = 100, world: W.World | None = None) -> Path:
    """Pretrain the toy VLM from scratch on the world's data sources; settings default to the world file's."""
    from stic.progress import live, progress_bar

    world = world or W.DEFAULT
    p = world.pretrain
    steps, batch_size = steps or p.steps, batch_size or p.batch_size
    lr, seed = lr or p.lr, p.seed if seed is None else seed
    processor = build_processor(world)
    model = build_model(processor, seed, world)
    collate = Collator(processor)
    rng = random.Random(10_000 + seed)  # pretraining scenes never overlap the held-out seeds
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step):  # warmup, then cosine down to a tenth: the checkpoint ends annealed
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    started, losses, curve = time.time(), [], []  # curve: mean loss per log_every steps (plateaus show here)
    bar = progress_bar(range(steps), desc="pretrain", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = collate([_example(rng, world) for _ in range(batch_size)])
        loss = model(**batch).loss if world.pretrain.loss == "token" else example_mean_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            curve.append(round(sum(losses[-log_every:]) / log_every, 4))
            bar.set_postfix(loss=f"{curve[-1]:.3f}", refresh=live())  # in a log: with the next redraw
    model.eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(time.time() - started, 1),
        "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4), "world": world.digest(),
        "loss_every": log_every, "loss_curve": curve}) + "\n")
    W.save_world(world, out / "world.yaml")
    return out
